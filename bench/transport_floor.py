"""How close the worker gets to Python gRPC servers that do less: the floors of a transport-bound model.

    python -m bench.transport_floor [--model mlp784] [--concurrency 1,8,32] [--rounds 3] [--duration 3]

Side by side, interleaved like `bench.run_all`, one `tritonclient.grpc.aio`
client each: the worker (`meshserve worker`, the real CLI), the worker with
its busy wait off (a copy of the repository whose config.yaml says
`max_busy_wait_us: 0`) and the `bench.floor_server` modes (fixed bytes;
protobuf; protobuf + one ONNX Runtime run per request). Then one ONNX Runtime
run at batch 1 in a tight loop in this process, against the same run's cost
inside the busy `aio-ort` server: on a server the weights and code are out of
the CPU caches by the next run, which is what batching amortizes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench import bare_ort
from bench.floor_server import MODES, ORT_LINE
from bench.floor_server import READY_LINE as FLOOR_READY
from bench.measure import Point, measure_point
from bench.processes import Child, Children, exit_cleanly_on_sigterm, free_port
from bench.repository import without_busy_wait
from bench.tritonclient_load import TritonClientLoad

WORKER = "worker"
WORKER_NO_BUSY_WAIT = "worker, busy wait off"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp784", help="a model with one FP32 input (what floor_server runs)")
    parser.add_argument("--model-repository", type=Path, help="default: the demo models, written to a temp dir")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--markdown", type=Path, default=Path(__file__).parent / "out" / "transport-floor.md")
    return parser.parse_args(argv)


def start_worker(children: Children, name: str, repository: Path) -> tuple[str, Child]:
    port = free_port()
    child = children.meshserve(
        name.replace(" ", "").replace(",", "-"),
        "worker",
        "--model-repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
    )
    return f"127.0.0.1:{port}", child


def start_floor(children: Children, mode: str, model_file: Path) -> tuple[str, Child]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.floor_server", "--mode", mode, "--model-file", str(model_file)]
    child = children.start(f"floor-{mode}", [*argv, "--port", str(port)])
    child.wait_for_output(FLOOR_READY, 60)
    return f"127.0.0.1:{port}", child


def isolated_ort_us(model_file: Path, runs: int = 20000) -> float:
    """Thread CPU microseconds of one batch-1 run, back to back in this process (warm caches)."""
    session = bare_ort.session(model_file, 1)
    feeds = bare_ort.random_inputs(session, 1)
    for _ in range(1000):
        session.run(None, feeds)  # type: ignore[attr-defined]
    started = time.thread_time()
    for _ in range(runs):
        session.run(None, feeds)  # type: ignore[attr-defined]
    return (time.thread_time() - started) / runs * 1e6


async def measure(
    peers: dict[str, tuple[str, Child]], model: str, feeds: dict[str, np.ndarray], args: argparse.Namespace
) -> list[Point]:
    clients = {name: TritonClientLoad(url) for name, (url, _) in peers.items()}
    try:
        for name, client in clients.items():
            await client.wait_ready(model, 120.0, peers[name][1].check_alive, interval_s=0.1)
        points = []
        names = list(peers)
        for concurrency in [int(level) for level in args.concurrency.split(",")]:
            for round_index in range(args.rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    point = await measure_point(
                        name,
                        clients[name],
                        {"server": peers[name][1]},
                        model,
                        feeds,
                        concurrency,
                        round_index,
                        args.duration,
                        args.warmup,
                    )
                    points.append(point)
                    print(
                        f"round {round_index + 1} c={concurrency:<3} {name:24} {point.result.throughput:8.1f} req/s",
                        flush=True,
                    )
        return points
    finally:
        for client in clients.values():
            await client.close()


def render(points: list[Point], model: str, ort_in_server_us: str, ort_isolated_us: float) -> str:
    lines = [
        f"### Transport floors, {model} (`python -m bench.transport_floor`)",
        "",
        "| c | server | req/s | p50 ms | server CPU ms per request | client CPU ms per request "
        "| client wake-ups per request |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    peers = list(dict.fromkeys(p.peer for p in points))

    def med(values: list[float]) -> float:
        return float(np.median(values))

    for concurrency in sorted({p.concurrency for p in points}):
        for peer in peers:
            mine = [p for p in points if p.concurrency == concurrency and p.peer == peer]
            lines.append(
                f"| {concurrency} | {peer} | {med([p.result.throughput for p in mine]):.0f} "
                f"| {med([p.result.p50_ms for p in mine]):.2f} "
                f"| {med([p.cpu_ms_per_request['server'] for p in mine]):.3f} "
                f"| {med([p.cpu_ms_per_request['client'] for p in mine]):.3f} "
                f"| {med([p.client_switches_per_request or 0.0 for p in mine]):.1f} |"
            )
    lines += [
        "",
        f"ONNX Runtime, one batch-1 run: {ort_isolated_us:.1f} us of CPU back to back in one process; "
        f"{ort_in_server_us} us inside the busy `aio-ort` server.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_cleanly_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="meshserve-floor-"))
    repository = args.model_repository
    if repository is None:
        from meshserve.demo_models import write_demo_repository

        repository = work / "models"
        write_demo_repository(repository)
    model_file = bare_ort.model_path(repository / args.model)
    session = bare_ort.session(model_file, 1)
    feeds = {name: array for name, array in bare_ort.random_inputs(session, 1).items()}
    with Children(work / "logs") as children:
        peers = {
            WORKER: start_worker(children, WORKER, repository),
            WORKER_NO_BUSY_WAIT: start_worker(
                children, WORKER_NO_BUSY_WAIT, without_busy_wait(repository, work / "no-busy-wait", [args.model])
            ),
        }
        for mode in MODES:
            peers[mode] = start_floor(children, mode, model_file)
        points = asyncio.run(measure(peers, args.model, feeds, args))
        ort_child = peers["aio-ort"][1]
        ort_child.stop()
        report = next((line for line in ort_child.output().splitlines() if line.startswith(ORT_LINE)), "")
        ort_in_server = report.removeprefix(ORT_LINE).split()[0] if report else "?"
    markdown = render(points, args.model, ort_in_server, isolated_ort_us(model_file))
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
