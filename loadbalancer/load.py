"""Per-endpoint load: peak-EWMA latency times outstanding requests (Finagle's and Linkerd's cost).

The latency estimate jumps up to any slower observation at once ("peak") and
decays towards faster ones with time constant `decay_s`; it also decays while
no answer arrives, so an endpoint that was slow once is probed again later.
Outstanding work is this balancer's own in-flight attempts, plus, while the
worker's latest load report is fresh, the part of that report that is not
ours (the worker's in-flight count, which includes its queue, counts other
gateways' requests too).
"""

from __future__ import annotations

import math
from collections.abc import Callable


class PeakEwma:
    """A latency estimate in seconds, peak-sensitive and decaying with time."""

    __slots__ = ("_clock", "_decay_s", "_estimate", "_stamp")

    def __init__(self, initial_s: float, decay_s: float, clock: Callable[[], float]) -> None:
        self._estimate = initial_s
        self._decay_s = decay_s
        self._clock = clock
        self._stamp = clock()

    def observe(self, rtt_s: float) -> None:
        now = self._clock()
        if rtt_s > self._estimate:
            self._estimate = rtt_s
        else:
            weight = math.exp(-max(now - self._stamp, 0.0) / self._decay_s)
            self._estimate = self._estimate * weight + rtt_s * (1.0 - weight)
        self._stamp = now

    def current(self) -> float:
        """The estimate decayed to now (as if a zero-latency answer had just come: Finagle's probe)."""
        weight = math.exp(-max(self._clock() - self._stamp, 0.0) / self._decay_s)
        return self._estimate * weight

    @property
    def raw(self) -> float:
        """The estimate at the last observation, without decay (the neutral start for new peers)."""
        return self._estimate


class EndpointLoad:
    """What p2c_ewma and least_request compare for one endpoint."""

    __slots__ = ("_clock", "_report_ttl_s", "_reported", "_reported_at", "ewma", "pending")

    def __init__(self, initial_latency_s: float, decay_s: float, report_ttl_s: float, clock: Callable[[], float]):
        self.ewma = PeakEwma(initial_latency_s, decay_s, clock)
        self.pending = 0
        self._clock = clock
        self._report_ttl_s = report_ttl_s
        self._reported = 0
        self._reported_at = -math.inf

    def report(self, queue_depth: int, in_flight: int) -> None:
        """A worker's load report, read while the attempt that carried it is still pending.

        The worker counts our other pending attempts but not the one it just
        answered; what is left is other clients' work. Its in-flight count
        already includes the queued requests, so the two are not added.
        """
        ours = max(self.pending - 1, 0)
        self._reported = max(max(queue_depth, in_flight, 0) - ours, 0)
        self._reported_at = self._clock()

    def outstanding(self) -> int:
        if self._clock() - self._reported_at <= self._report_ttl_s:
            return self.pending + self._reported
        return self.pending

    def cost(self) -> float:
        """Expected wait for one more request: latency x (outstanding + 1)."""
        return self.ewma.current() * (self.outstanding() + 1)
