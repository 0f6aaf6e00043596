"""What callers see when a worker or gateway drains while they are still sending: a tally over many SIGTERMs.

Each round starts a real `meshserve worker` (mlp784 only, `--drain-delay 0`),
sends it requests from several callers back to back, signals SIGTERM after a
random 0-50 ms, and lets every caller go on for `--lag-ms` after its first
failure, as a balancer does until the registry or a refusal takes the worker
out of rotation. With `--target gateway` the process each round starts and
signals is a `meshserve gateway` (`--drain-delay 0`) in front of one worker
and the embedded registry that stay up for the whole run. The answers it
counts: served, refused as draining (retried elsewhere at once), cancelled
by grpc, connection failures, and any request that took over a second. Run
it on two commits to compare drains:

    python -m bench.drain_race --rounds 40 [--target gateway]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from subprocess import Popen

import grpc
import numpy as np

from bench.bench_balancer import model_repository
from bench.processes import Children, exit_cleanly_on_sigterm, free_port
from loadbalancer.connection import CHANNEL_OPTIONS
from loadbalancer.errors import classify
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

SLOW_S = 1.0


def answer_kind(error: grpc.aio.AioRpcError) -> str:
    failure = classify(error)
    if failure.draining:
        return "refused as draining"
    if error.code() == grpc.StatusCode.CANCELLED:
        return "cancelled by grpc"
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return "connection failed"
    return error.code().name


def start_worker(children: Children, repository: Path, *extra: str) -> tuple[Popen[bytes], int]:
    port = free_port()
    worker = children.meshserve(
        f"worker-{port}",
        *("worker", "--model-repository", str(repository), "--port", str(port), "--host", "127.0.0.1"),
        *("--metrics-port", "0", *extra),
    )
    return worker.popen, port


def start_gateway(children: Children, registry_url: str) -> tuple[Popen[bytes], int]:
    port = free_port()
    gateway = children.meshserve(
        f"gateway-{port}",
        *("gateway", "--registry", registry_url, "--port", str(port), "--host", "127.0.0.1"),
        *("--metrics-port", "0", "--drain-delay", "0", "--drain-grace", "5"),
    )
    return gateway.popen, port


async def one_round(
    start: Callable[[], tuple[Popen[bytes], int]], callers: int, lag_s: float, tally: Counter[str]
) -> None:
    process, port = start()
    request = pb.ModelInferRequest(model_name="mlp784")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    request.raw_input_contents.append(np.ones((1, 784), np.float32).tobytes())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=list(CHANNEL_OPTIONS)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        serving_by = time.monotonic() + 60
        while True:  # a gateway answers UNAVAILABLE until the worker has registered
            try:
                await stub.ModelInfer(request, timeout=60, wait_for_ready=True)
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > serving_by:
                    raise
                await asyncio.sleep(0.2)

        async def caller() -> None:
            first_failure: float | None = None
            while first_failure is None or time.monotonic() - first_failure < lag_s:
                sent = time.monotonic()
                try:
                    await stub.ModelInfer(request, timeout=5)
                    kind = "served"
                except grpc.aio.AioRpcError as error:
                    kind = answer_kind(error)
                    first_failure = first_failure or time.monotonic()
                tally[kind] += 1
                if time.monotonic() - sent > SLOW_S:
                    tally[f"took over {SLOW_S:g} s ({kind})"] += 1

        tasks = [asyncio.create_task(caller()) for _ in range(callers)]
        await asyncio.sleep(random.uniform(0.0, 0.05))
        process.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
        tally[f"exit code {await asyncio.to_thread(process.wait, 30)}"] += 1


async def run(target: str, rounds: int, callers: int, lag_s: float) -> Counter[str]:
    tally: Counter[str] = Counter()
    repository = model_repository()
    with Children(Path(tempfile.mkdtemp(prefix="bench-drain-"))) as children:
        if target == "worker":
            start = functools.partial(start_worker, children, repository, "--drain-delay", "0", "--drain-grace", "5")
        else:
            registry_port = free_port()
            children.meshserve("registry", "registry", "--port", str(registry_port))
            registry_url = f"consul://127.0.0.1:{registry_port}"
            start_worker(children, repository, "--registry", registry_url, "--advertise-address", "127.0.0.1")
            start = functools.partial(start_gateway, children, registry_url)
        for _ in range(rounds):
            await one_round(start, callers, lag_s, tally)
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("worker", "gateway"), default="worker", help="the process that drains")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--lag-ms", type=float, default=50.0, help="how long a caller goes on after its first failure")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    tally = asyncio.run(run(args.target, args.rounds, args.callers, args.lag_ms / 1000))
    print(f"{args.rounds} SIGTERMs to a {args.target}, {args.callers} callers, "
          f"{args.lag_ms:g} ms lag after the first failure:")  # fmt: skip
    for kind, count in sorted(tally.items()):
        print(f"  {kind}: {count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
