"""What a server's drain waits for, shared by worker and gateway: requests in flight, and callers to stop sending.

A drain (SIGTERM) first keeps serving while whoever routes traffic here hears
that this server is going (health NOT_SERVING, deregistration), then refuses
new requests as UNAVAILABLE with `meshserve-draining: 1`, which callers retry
on another server at once. It stops the gRPC server only once the requests in
flight are answered and refused requests have stopped arriving: a request that
reaches gRPC while its server shuts down is cancelled by gRPC before any handler
sees it, or sits unanswered until the server's flush grace runs out.
"""

from __future__ import annotations

import asyncio
import logging
import time

from loadbalancer.errors import DRAINING_METADATA_KEY

# The gRPC server stops only once no request has arrived for this long. Callers stop sending
# after their first refusal (a balancer takes the server out of rotation), or when the registry
# or health check they follow drops this server.
QUIET_BEFORE_STOP_S = 0.2
# Callers that never stop (a client looping on a draining server) hold the stop back this long at most.
QUIET_WAIT_MAX_S = 2.0
# After the drain's waits, how long gRPC may take to flush the last responses.
FLUSH_GRACE_S = 2.0
# Trailing metadata on a draining refusal: balancers retry it elsewhere at once.
DRAINING_METADATA = (DRAINING_METADATA_KEY, "1")


class DrainGate:
    """Counts the requests in flight and, once `begin` was called, the ones refused for the drain.

    The data path calls `enter`/`leave` around each request and `refuse` for
    one it turns away while `draining`; the drain calls `begin`, then `settle`.
    """

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.refusals = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # When the drain began or, later, when the last refused request arrived (monotonic).
        self._last_refusal = 0.0

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    def begin(self) -> None:
        """From now on the data path refuses every new request (`draining` is True)."""
        self.draining = True
        self._last_refusal = time.monotonic()

    def refuse(self) -> None:
        """Records a request turned away for the drain."""
        self.refusals += 1
        self._last_refusal = time.monotonic()

    async def wait_idle(self, within: float) -> bool:
        """True once no request is in flight, False if `within` seconds passed first."""
        if self._idle.is_set():  # wait_for with no time left fails even an event already set
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), within)
        except TimeoutError:
            return False
        return True

    async def wait_quiet(self, quiet_s: float, within: float) -> bool:
        """True once no request was refused for `quiet_s` seconds since the drain began, False if
        `within` seconds passed first (callers that keep sending to a draining server)."""
        give_up = time.monotonic() + within
        while True:
            now = time.monotonic()
            quiet_at = self._last_refusal + quiet_s
            if now >= quiet_at:
                return True
            if now >= give_up:
                return False
            await asyncio.sleep(min(quiet_at, give_up) - now)

    async def settle(self, give_up: float, log: logging.Logger) -> None:
        """Waits for the requests in flight until the monotonic time `give_up`, then for callers to stop
        sending (at most QUIET_WAIT_MAX_S, and not past `give_up`); logs what it stopped waiting for."""
        if not await self.wait_idle(max(0.0, give_up - time.monotonic())):
            log.warning("drain grace ran out with %d requests in flight", self.in_flight)
            return
        within = min(QUIET_WAIT_MAX_S, max(0.0, give_up - time.monotonic()))
        if not await self.wait_quiet(QUIET_BEFORE_STOP_S, within) and self.refusals:
            log.warning("requests were still arriving after %.1fs of waiting for callers to stop", within)
