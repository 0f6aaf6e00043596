"""Where the mesh path spends CPU: py-spy or perf samples of the gateway and the worker under load.

    python -m bench.profile_mesh [--model mlp784] [--concurrency 32] [--seconds 6] [--top 25] [--perf]

Starts registry + worker + gateway with the real CLI, loads the gateway from
`tritonclient.grpc.aio`, records both servers with py-spy (`pip install
py-spy`; needs ptrace rights) and prints, per process, the functions with the
most samples on the stack (inclusive) and at the top of it (self), plus the
CPU milliseconds each process spent per request.

With `--perf`, Linux `perf` samples them instead (`perf record`, needs
`perf_event_paranoid` <= 2 for one's own processes): every thread, kernel
included, split by thread, by library and by function. That shows what
py-spy cannot: how much of a process is the kernel switching and waking its
threads, and how much grpc's own threads use.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import bare_ort
from bench.otlp_receiver import READY_LINE as OTLP_READY
from bench.processes import Child, Children, free_port
from bench.tritonclient_load import TritonClientLoad

# Frames worth listing by inclusive time; the rest (CLI, event loop plumbing) is on every stack.
INTERESTING = ("gateway/", "worker/", "loadbalancer/", "registry/", "protos/", "grpc/aio", "tenacity", "opentelemetry")


def parse_collapsed(text: str) -> tuple[Counter[str], Counter[str], int]:
    """py-spy `--format raw` lines (`frame;frame;... count`) -> (inclusive, self, total samples)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return inclusive, own, total


@dataclass
class PerfProfile:
    """Leaf frames of `perf script` samples, counted by thread, by library and by function."""

    threads: Counter[str] = field(default_factory=Counter)
    libraries: Counter[str] = field(default_factory=Counter)
    functions: Counter[str] = field(default_factory=Counter)
    total: int = 0


# `perf script -F comm,tid,ip,sym,dso`: one line per sample, or with `-g` a
# `comm tid` line followed by the sample's frames, leaf first, each on a tab-indented line.
_PERF_SAMPLE = re.compile(r"^\s*(?P<comm>\S.*?)\s+(?P<tid>\d+)\s+[0-9a-f]+\s+(?P<sym>.*?)\s+\((?P<dso>[^()]*)\)\s*$")
_PERF_HEADER = re.compile(r"^\s*(?P<comm>\S.*?)\s+(?P<tid>\d+)\s*$")
_PERF_FRAME = re.compile(r"^\t\s*[0-9a-f]+\s+(?P<sym>.*?)\s+\((?P<dso>[^()]*)\)\s*$")


def parse_perf_script(text: str, pid: int) -> PerfProfile:
    """`perf script -F comm,tid,ip,sym,dso` output -> counts of each sample's leaf frame.

    The thread whose id is the process id is the main thread, where the event loop runs.
    """
    profile = PerfProfile()

    def count(comm: str, tid: str, sym: str, dso: str) -> None:
        thread = "main" if tid == str(pid) else f"{comm} {tid}"
        library = Path(dso).name or dso
        profile.threads[thread] += 1
        profile.libraries[library] += 1
        profile.functions[f"{sym} ({library})"] += 1
        profile.total += 1

    waiting: tuple[str, str] | None = None  # a -g sample's thread, until its leaf frame
    for line in text.splitlines():
        frame = _PERF_FRAME.match(line)
        if frame:
            if waiting is not None:
                count(*waiting, frame["sym"], frame["dso"])
                waiting = None
            continue
        sample = _PERF_SAMPLE.match(line)
        if sample:
            count(sample["comm"], sample["tid"], sample["sym"], sample["dso"])
            continue
        header = _PERF_HEADER.match(line)
        if header:
            waiting = (header["comm"], header["tid"])
    return profile


def start_mesh(
    children: Children, repository: Path, api_key: str, env: dict[str, str] | None = None
) -> tuple[Child, Child, str]:
    registry_port, worker_port, gateway_port = free_port(), free_port(), free_port()
    children.meshserve("registry", "registry", "--port", str(registry_port))
    registry_url = f"consul://127.0.0.1:{registry_port}"
    time.sleep(1.0)
    worker = children.meshserve(
        "worker",
        "worker",
        "--model-repository",
        str(repository),
        "--registry",
        registry_url,
        "--port",
        str(worker_port),
        "--host",
        "127.0.0.1",
        "--advertise-address",
        "127.0.0.1",
        "--log-level",
        "warning",
        env=env,
    )
    gateway = children.meshserve(
        "gateway",
        "gateway",
        "--registry",
        registry_url,
        "--port",
        str(gateway_port),
        "--host",
        "127.0.0.1",
        "--api-key",
        api_key,
        "--metrics-port",
        str(free_port()),
        "--log-level",
        "warning",
        env=env,
    )
    return worker, gateway, f"127.0.0.1:{gateway_port}"


async def load(
    url: str, api_key: str, model: str, repository: Path, concurrency: int, seconds: float, ready: asyncio.Event
) -> float:
    client = TritonClientLoad(url, api_key)
    try:
        await client.wait_ready(model, 120.0)
        session = bare_ort.session(bare_ort.model_path(repository / model), 1)
        ready.set()
        result = await client.run(model, bare_ort.random_inputs(session, 1), concurrency, seconds, 1.0)
        print(f"load: {result.throughput:.0f} req/s, p50 {result.p50_ms:.2f} ms, errors {result.errors}", flush=True)
        return result.throughput * seconds
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp784")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--native", action="store_true", help="also sample C frames (grpc core, protobuf)")
    parser.add_argument("--tracing", action="store_true", help="100%% sampled spans to a local OTLP receiver")
    parser.add_argument("--perf", action="store_true", help="sample with Linux perf: every thread, kernel included")
    args = parser.parse_args(argv)
    if args.perf:
        sampler = shutil.which("perf")
        if sampler is None:
            raise SystemExit("perf not found: install linux-perf (Debian) or linux-tools")
    else:
        sampler = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(sampler, os.X_OK):
            raise SystemExit("py-spy not found: pip install py-spy")

    from meshserve.demo_models import write_demo_repository

    work = Path(tempfile.mkdtemp(prefix="meshserve-profile-"))
    repository = work / "models"
    write_demo_repository(repository)
    api_key = secrets.token_hex(8)
    with Children(work / "logs") as children:
        env = None
        if args.tracing:
            receiver_port = free_port()
            receiver = children.start(
                "otlp-receiver", [sys.executable, "-m", "bench.otlp_receiver", "--port", str(receiver_port)]
            )
            receiver.wait_for_output(OTLP_READY, 30)
            env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_TRACES_SAMPLER": "always_on",
            }
        worker, gateway, url = start_mesh(children, repository, api_key, env)
        recorders = {}
        cpu_before = {}

        def record(name: str, child: Child) -> None:
            cpu_before[name] = child.cpu_seconds()
            pid = str(child.popen.pid)
            if args.perf:
                out = work / f"{name}.perf.data"
                command = [sampler, "record", "--quiet", "-F", "999", "-p", pid, "-o", str(out)]
                command += ["--", "sleep", str(args.seconds)]
            else:
                out = work / f"{name}.txt"
                command = [sampler, "record", "--pid", pid, "--duration", str(int(args.seconds)), "--rate", "200"]
                # Native unwinding has to pause the process; Python-only sampling need not.
                command += ["--format", "raw", *(["--native"] if args.native else ["--nonblocking"])]
                command += ["--output", str(out)]
            recorders[name] = (
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                out,
                child,
            )

        async def profiled_load() -> float:
            ready = asyncio.Event()
            task = asyncio.create_task(
                load(url, api_key, args.model, repository, args.concurrency, args.seconds + 1, ready)
            )
            await ready.wait()
            await asyncio.sleep(1.0)  # the load's warm-up second, before sampling starts
            record("gateway", gateway)
            record("worker", worker)
            return await task

        requests = asyncio.run(profiled_load())
        for name, (proc, out, child) in recorders.items():
            proc.wait(timeout=60)
            cpu_ms = (child.cpu_seconds() - cpu_before[name]) * 1000.0
            if args.perf:
                print_perf(name, sampler, out, child.popen.pid, cpu_ms / max(requests, 1), args.top)
                continue
            inclusive, own, total = parse_collapsed(out.read_text() if out.exists() else "")
            print(f"\n== {name}: {total} samples; ~{cpu_ms / max(requests, 1):.3f} CPU ms per request")
            print("  self (top of stack):")
            for frame, count in own.most_common(args.top):
                print(f"    {100 * count / max(total, 1):5.1f}%  {frame}")
            print("  inclusive (meshserve packages, grpc.aio, tenacity, opentelemetry):")
            ours = Counter({f: n for f, n in inclusive.items() if any(part in f for part in INTERESTING)})
            for frame, count in ours.most_common(args.top):
                print(f"    {100 * count / max(total, 1):5.1f}%  {frame}")
    return 0


def print_perf(name: str, perf: str, data: Path, pid: int, cpu_ms_per_request: float, top: int) -> None:
    script = subprocess.run(
        [perf, "script", "-i", str(data), "-F", "comm,tid,ip,sym,dso"],
        capture_output=True,
        text=True,
        check=False,
    )
    profile = parse_perf_script(script.stdout, pid)
    print(f"\n== {name}: {profile.total} samples (perf); ~{cpu_ms_per_request:.3f} CPU ms per request")
    for title, counts, limit in (
        ("by thread", profile.threads, top),
        ("by library", profile.libraries, 10),
        ("by function (leaf)", profile.functions, top),
    ):
        print(f"  {title}:")
        for key, count in counts.most_common(limit):
            print(f"    {100 * count / max(profile.total, 1):5.1f}%  {key}")


if __name__ == "__main__":
    sys.exit(main())
