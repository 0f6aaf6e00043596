"""Balancer benchmark: cost per pick as endpoints grow, and failure scenarios per policy.

    python -m bench.bench_balancer                      # everything, markdown on stdout
    python -m bench.bench_balancer --only picks         # just the pick cost table
    python -m bench.bench_balancer --policies p2c_ewma,round_robin --requests 300

Pick cost: one `policy.pick` on a set of N simulated endpoints (1 -> 1000), and
one whole `Balancer.call` with an attempt that returns at once (tenacity,
span, accounting included). p2c must stay flat: it reads two endpoints.

Scenarios (real `meshserve registry` + 3 `meshserve worker`s, the client is
ServiceWatcher -> Balancer -> unary ModelInfer, closed loop):
- slow: one worker with `--inject-latency-ms`; p50/p99 of the measured phase;
- kill9: one worker SIGKILLed a second into the run;
- rolling: each worker in turn SIGTERMed (drains), restarted, waited for.
Figures: p50/p99 in ms, requests, failed requests, share sent to the slow worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from loadbalancer.balancer import Balancer, ModelPolicy
from loadbalancer.connection import grpc_connector
from loadbalancer.discovery import EndpointSet
from loadbalancer.endpoint import Endpoint
from loadbalancer.errors import classify
from loadbalancer.load import EndpointLoad
from loadbalancer.policies import build_policy
from loadbalancer.settings import BalancerSettings
from protos import grpc_service_pb2, grpc_service_pb2_grpc
from registry.discovery import ServiceWatcher
from registry.model import EndpointChange, ServiceInstance, model_tag
from tests.harness import ManagedProcess, ProcessGroup, free_port

POLICIES = ("p2c_ewma", "least_request", "round_robin", "consistent_hash")
SIZES = (1, 10, 100, 1000)
REPEATS = 7
MODEL = "mlp784"


# -- pick cost --------------------------------------------------------------------


class _NoConnection:
    async def close(self) -> None:
        pass


def _instance(n: int) -> ServiceInstance:
    return ServiceInstance(id=f"sim-{n}", address="10.0.0.1", port=20000 + n, tags=(model_tag(MODEL, 1),))


def pick_cost_us(policy_name: str, size: int, picks: int) -> float:
    clock = time.monotonic
    members = EndpointSet(MODEL, "1")
    rng = random.Random(1)
    for n in range(size):
        load = EndpointLoad(0.002 + rng.random() * 0.002, 10.0, 1.0, clock)
        load.pending = rng.randrange(4)
        members.add(Endpoint(_instance(n), _NoConnection(), load, clock))
    policy = build_policy(policy_name, least_request_choices=2, virtual_nodes=100, rng=rng)
    keys = [f"user-{i}" for i in range(1024)]
    policy.pick(members, (), clock(), keys[0])  # builds the hash ring outside the timing
    start = time.perf_counter()
    for i in range(picks):
        policy.pick(members, (), clock(), keys[i & 1023])
    return (time.perf_counter() - start) / picks * 1e6


async def call_cost_us(size: int, calls: int) -> float:
    balancer = Balancer(BalancerSettings(), lambda _inst: _NoConnection())
    balancer.apply([EndpointChange("added", _instance(n)) for n in range(size)])

    async def attempt(endpoint: Endpoint, _remaining: float | None) -> str:
        return endpoint.id

    for _ in range(100):
        await balancer.call(MODEL, "1", attempt, timeout=5.0)
    start = time.perf_counter()
    for _ in range(calls):
        await balancer.call(MODEL, "1", attempt, timeout=5.0)
    elapsed = time.perf_counter() - start
    await balancer.close()
    return elapsed / calls * 1e6


def bench_picks(policies: tuple[str, ...], picks: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for size in SIZES:
        row: dict[str, object] = {"endpoints": size}
        for policy in policies:
            # Best of several short runs: on a shared machine the minimum is the cost, the rest is noise.
            row[policy] = round(min(pick_cost_us(policy, size, picks) for _ in range(REPEATS)), 2)
        row["Balancer.call"] = round(min(asyncio.run(call_cost_us(size, picks // 10)) for _ in range(REPEATS)), 1)
        rows.append(row)
    return rows


# -- scenarios ------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    scenario: str
    policy: str
    requests: int = 0
    failed: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    to_slow_pct: float | None = None
    errors: dict[str, int] = field(default_factory=dict)


class LoadClient:
    """ServiceWatcher -> Balancer -> unary ModelInfer; records latencies and failures."""

    def __init__(self, registry_url: str, policy: str) -> None:
        self.balancer = Balancer(BalancerSettings(), grpc_connector)
        self.balancer.set_model_policy(MODEL, ModelPolicy(policy=policy))  # type: ignore[arg-type]
        self.watcher = ServiceWatcher(registry_url)
        self.request = grpc_service_pb2.ModelInferRequest(model_name=MODEL, model_version="1")
        tensor = self.request.inputs.add(name="input", datatype="FP32")
        tensor.shape.extend([1, 784])
        self.request.raw_input_contents.append(np.ones((1, 784), np.float32).tobytes())
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.served_by: Counter[str] = Counter()
        self._rng = random.Random(3)
        self._follow = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        async for changes in self.watcher:
            self.balancer.apply(changes)

    async def _attempt(self, endpoint: Endpoint, remaining: float | None) -> None:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(endpoint.connection.channel)  # type: ignore[attr-defined]
        call = stub.ModelInfer(self.request, timeout=remaining)
        await call
        trailers = dict(await call.trailing_metadata() or ())
        if "meshserve-queue-depth" in trailers:
            endpoint.report_load(int(trailers["meshserve-queue-depth"]), int(trailers.get("meshserve-in-flight", 0)))
        self.served_by[endpoint.target] += 1

    async def infer(self) -> None:
        start = time.perf_counter()
        try:
            key = f"user-{self._rng.randrange(100)}"
            await self.balancer.call(MODEL, "1", self._attempt, timeout=5.0, hash_key=key)
        except Exception as exc:
            self.errors[classify(exc).describe()[:80]] += 1
            return
        self.latencies.append(time.perf_counter() - start)

    async def closed_loop(self, clients: int, requests: int) -> None:
        async def caller(count: int) -> None:
            for _ in range(count):
                await self.infer()

        await asyncio.gather(*(caller(requests // clients) for _ in range(clients)))

    @contextlib.asynccontextmanager
    async def paced(self, clients: int, pause_s: float):  # type: ignore[no-untyped-def]
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                await self.infer()
                await asyncio.sleep(pause_s)

        tasks = [asyncio.create_task(caller()) for _ in range(clients)]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    async def wait_for(self, targets: set[str], within_s: float = 60.0) -> None:
        deadline = time.monotonic() + within_s
        while {e.target for e in self.balancer.endpoints(MODEL)} != targets:
            if time.monotonic() > deadline:
                raise TimeoutError(f"balancer never saw {targets}")
            await asyncio.sleep(0.05)

    def result(self, scenario: str, policy: str, slow: str | None = None) -> ScenarioResult:
        ms = np.array(self.latencies) * 1000 if self.latencies else np.array([0.0])
        total = len(self.latencies) + sum(self.errors.values())
        return ScenarioResult(
            scenario=scenario,
            policy=policy,
            requests=total,
            failed=sum(self.errors.values()),
            p50_ms=round(float(np.percentile(ms, 50)), 2),
            p99_ms=round(float(np.percentile(ms, 99)), 2),
            to_slow_pct=round(100 * self.served_by[slow] / max(sum(self.served_by.values()), 1), 1) if slow else None,
            errors=dict(self.errors),
        )

    async def close(self) -> None:
        self._follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._follow
        await self.watcher.close()
        await self.balancer.close()


def start_workers(
    group: ProcessGroup, repo: Path, url: str, count: int, *extra: str
) -> list[tuple[ManagedProcess, str]]:
    started = []
    for _ in range(count):
        port = free_port()
        args = ["worker", "--model-repository", str(repo), "--port", str(port), "--registry", url]
        proc = group.start(f"worker-{port}", *args, "--drain-delay", "0", "--drain-grace", "5", *extra)
        started.append((proc, f"127.0.0.1:{port}"))
    for proc, address in started:
        proc.wait_serving(address)
    return started


async def scenario_slow(group: ProcessGroup, repo: Path, policy: str, requests: int) -> ScenarioResult:
    _, url = group.registry()
    workers = start_workers(group, repo, url, 2) + start_workers(group, repo, url, 1, "--inject-latency-ms", "100")
    client = LoadClient(url, policy)
    try:
        await client.wait_for({address for _, address in workers})
        await client.closed_loop(clients=4, requests=60)  # warm-up
        client.latencies.clear()
        client.served_by.clear()
        await client.closed_loop(clients=4, requests=requests)
        return client.result("slow worker (+100 ms)", policy, slow=workers[-1][1])
    finally:
        await client.close()


async def scenario_kill9(group: ProcessGroup, repo: Path, policy: str, requests: int) -> ScenarioResult:
    _, url = group.registry()
    workers = start_workers(group, repo, url, 3)
    client = LoadClient(url, policy)
    try:
        await client.wait_for({address for _, address in workers})
        async with client.paced(clients=4, pause_s=0.002):
            await asyncio.sleep(1.0)
            workers[0][0].kill9()
            await asyncio.sleep(3.0)
        return client.result("kill -9 one of 3", policy)
    finally:
        await client.close()


async def scenario_rolling(group: ProcessGroup, repo: Path, policy: str, requests: int) -> ScenarioResult:
    _, url = group.registry()
    workers = start_workers(group, repo, url, 3)
    client = LoadClient(url, policy)
    try:
        await client.wait_for({address for _, address in workers})
        async with client.paced(clients=4, pause_s=0.002):
            for index in range(len(workers)):
                old, _ = workers[index]
                old.signal(signal.SIGTERM)
                await asyncio.to_thread(old.popen.wait, 30)
                workers[index] = (await asyncio.to_thread(start_workers, group, repo, url, 1))[0]
                await client.wait_for({address for _, address in workers})
            await asyncio.sleep(0.5)
        return client.result("rolling restart of 3", policy)
    finally:
        await client.close()


SCENARIOS: dict[str, Callable[[ProcessGroup, Path, str, int], object]] = {
    "slow": scenario_slow,
    "kill9": scenario_kill9,
    "rolling": scenario_rolling,
}


def run_scenarios(policies: tuple[str, ...], names: list[str], requests: int, repo: Path) -> list[ScenarioResult]:
    results = []
    for name in names:
        for policy in policies:
            with ProcessGroup() as group:
                result = asyncio.run(SCENARIOS[name](group, repo, policy, requests))  # type: ignore[arg-type]
            print(
                f"  {result.scenario:24s} {policy:16s} p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:8.2f} ms  "
                f"failed {result.failed}/{result.requests}",
                file=sys.stderr,
            )
            results.append(result)
    return results


def model_repository() -> Path:
    """The demo repository, trimmed to the small MLP so that workers start fast."""
    from meshserve.demo_models import write_demo_repository

    root = Path(tempfile.mkdtemp(prefix="bench-lb-"))
    write_demo_repository(root / "all")
    shutil.move(root / "all" / MODEL, root / MODEL)
    shutil.rmtree(root / "all")
    return root


# -- report -------------------------------------------------------------------------


def markdown(pick_rows: list[dict[str, object]], results: list[ScenarioResult], policies: tuple[str, ...]) -> str:
    lines = []
    if pick_rows:
        columns = ["endpoints", *policies, "Balancer.call"]
        lines += [
            "Cost per pick (us, best of 7 runs) as the endpoint count grows; `Balancer.call` is a whole call "
            "with an attempt that returns at once (tenacity, span, load accounting).",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
        ]
        lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in pick_rows]
        lines.append("")
    if results:
        lines += [
            "| scenario | policy | requests | failed | p50 ms | p99 ms | to slow worker |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results:
            slow = "" if r.to_slow_pct is None else f"{r.to_slow_pct}%"
            lines.append(
                f"| {r.scenario} | {r.policy} | {r.requests} | {r.failed} | {r.p50_ms} | {r.p99_ms} | {slow} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["picks", "scenarios"], default=None)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--requests", type=int, default=400, help="measured requests in the slow-worker scenario")
    parser.add_argument("--picks", type=int, default=5000, help="picks per timed run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    policies = tuple(p for p in args.policies.split(",") if p)
    pick_rows = bench_picks(policies, args.picks) if args.only != "scenarios" else []
    results: list[ScenarioResult] = []
    if args.only != "picks":
        repo = model_repository()
        try:
            results = run_scenarios(policies, [s for s in args.scenarios.split(",") if s], args.requests, repo)
        finally:
            shutil.rmtree(repo, ignore_errors=True)
    print(markdown(pick_rows, results, policies))
    if args.json:
        args.json.write_text(json.dumps({"picks": pick_rows, "scenarios": [asdict(r) for r in results]}, indent=2))
    return 0 if all(r.failed == 0 for r in results if r.scenario != "slow worker (+100 ms)") else 1


if __name__ == "__main__":
    sys.exit(main())
