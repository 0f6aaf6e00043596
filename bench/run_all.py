"""The side-by-side benchmark of issues 2, 5 and 6: one run, one machine, every peer.

    python -m bench.run_all [--duration 2] [--rounds 7] [--markdown bench/out/last-run.md]

Starts, with the real CLI, an embedded registry + worker + gateway (the mesh;
its worker is also called directly), the same again with tracing on (100%
sampling, OTLP to a local receiver process), and Triton Inference Server
(nvidia-pytriton) on the same ONNX models; loads each from `tritonclient.grpc.aio`
at concurrency 1, 8 and 32, interleaved (every peer at one level before the
next level, the peer order rotating per round) so drift hits all peers alike;
stops everything (always, also on failure). Bare ONNX Runtime runs in-process
twice: a sweep over batch sizes and thread layouts before the rounds (the
servers up but idle), and the sweep's best configuration again as one more
peer in every round of the compute-bound model at the top concurrency, so the
worker's ratio to it compares two figures measured side by side. Prints a
markdown report (and writes it and a JSON file) with the targets' ratios
marked met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from bench import bare_ort
from bench.bare_proxy import READY_LINE as BARE_PROXY_READY
from bench.measure import Point, measure_point
from bench.otlp_receiver import READY_LINE as OTLP_READY
from bench.processes import Child, Children, exit_cleanly_on_sigterm, free_port, wait_until, worker_providers
from bench.report import (
    BARE_ORT,
    BARE_PROXY,
    COMPUTE_MODEL,
    CPU,
    MESH,
    MESH_NO_BUSY_WAIT,
    MESH_NO_POLL,
    MESH_TRACED,
    TRANSPORT_MODEL,
    TRITON,
    WORKER,
    render_markdown,
)
from bench.repository import without_busy_wait
from bench.triton_server import READY_LINE as TRITON_READY
from bench.tritonclient_load import CPU_TOLERANCE, GPU_TOLERANCE, TritonClientLoad, check_outputs_agree
from meshserve.loadgen import LevelResult
from worker.config import load_model_config

# The worker logs its automatic intra-op thread choice per model version at load.
WORKER_THREADS_LINE = re.compile(r"model (\S+) version \d+: (\d+) intra-op thread\(s\)(?: x (\d+) instance)?")
WORKER_PINNED_LINE = re.compile(r"model (\S+) version \d+ instance \d+ runs on cores")
DEFAULT_TRITON_PYTHON = Path(__file__).resolve().parent.parent / ".venv-triton" / "bin" / "python"


@dataclass
class Peer:
    """One server the load is pointed at, and the child processes whose CPU it spends."""

    name: str
    url: str
    models: tuple[str, ...]
    processes: dict[str, Child]
    api_key: str | None = None
    client: TritonClientLoad | None = None


def sampler_env(ratio: float) -> dict[str, str]:
    """The traced mesh's sampler: every request at 1 (issue 6's setting), else a share of new traces."""
    if not 0.0 <= ratio <= 1.0:
        raise SystemExit(f"--tracing-ratio must lie in [0, 1], got {ratio}")
    if ratio == 1.0:
        return {"OTEL_TRACES_SAMPLER": "always_on"}
    return {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": repr(ratio)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Many short rounds over few long ones: the two figures of a pair are measured closer in time, and the
    # median of 7 per-round ratios holds against a round or two that drift (3 x 4 s read cnn's compute-limit
    # ratio 0.81 / 0.93 / 0.81 in one run, on a 0.85 goal).
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each point")
    parser.add_argument("--rounds", type=int, default=7, help="repeats of the whole matrix; medians are reported")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--models", default=f"{TRANSPORT_MODEL},{COMPUTE_MODEL}")
    parser.add_argument("--mesh-workers", type=int, default=1, help="workers behind each gateway")
    parser.add_argument("--gateway-processes", type=int, default=1)
    parser.add_argument("--no-tracing", action="store_true", help="skip the traced mesh (issue 6)")
    parser.add_argument(
        "--tracing-ratio",
        type=float,
        default=1.0,
        help="share of requests the traced mesh samples (parentbased_traceidratio below 1; issue 6's goal is at 1)",
    )
    parser.add_argument(
        "--no-bare-proxy", action="store_true", help="skip the bare grpc.aio proxy peer (the hop's floor)"
    )
    parser.add_argument(
        "--no-busy-wait-peer",
        action="store_true",
        help="skip the mesh with the worker's and the gateway's busy waits off",
    )
    parser.add_argument(
        "--no-poll-peer", action="store_true", help="skip the mesh with the gateway's light-load poll off"
    )
    parser.add_argument("--no-triton", action="store_true", help="skip Triton (when nvidia-pytriton is missing)")
    parser.add_argument(
        "--triton-default-delay-us",
        type=int,
        default=0,
        # Like the worker's default; on mlp784 0 us also gave Triton its best c=8/c=32 throughput (vs 100, 500 us).
        help="Triton's max queue delay for models whose config.yaml sets none",
    )
    parser.add_argument(
        "--triton-default-max-batch", type=int, default=64, help="like the worker's default max_batch_size"
    )
    parser.add_argument(
        "--triton-python",
        type=Path,
        default=DEFAULT_TRITON_PYTHON if DEFAULT_TRITON_PYTHON.exists() else Path(sys.executable),
        help="interpreter with nvidia-pytriton (numpy<2): `make bench` builds .venv-triton",
    )
    parser.add_argument("--ort-seconds", type=float, default=1.5, help="seconds per batch size for bare ORT")
    parser.add_argument("--ort-batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--model-repository", type=Path, help="default: the demo models, written fresh")
    parser.add_argument("--markdown", type=Path, default=Path("bench/out/last-run.md"))
    parser.add_argument("--json", type=Path, default=Path("bench/out/last-run.json"))
    parser.add_argument("--log-dir", type=Path, help="children's logs [default: a temp dir]")
    return parser.parse_args(argv)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("onnxruntime-gpu", "onnxruntime", "grpcio", "protobuf", "tritonclient", "nvidia-pytriton", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found["meshserve commit"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return found


def triton_venv_versions(python: Path) -> dict[str, str]:
    """Versions inside the Triton peer's own environment (it cannot share meshserve's numpy/protobuf)."""
    script = (
        "import importlib.metadata as m\n"
        "for d in ('nvidia-pytriton', 'onnxruntime', 'numpy'):\n"
        "    print(d, m.version(d))"
    )
    try:
        out = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {f"{name} (Triton venv)": version for name, version in (line.split() for line in out.stdout.splitlines())}


def machine() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu_model, "kernel": platform.release()}


class Bench:
    def __init__(self, args: argparse.Namespace, repository: Path, children: Children) -> None:
        self.args = args
        self.repository = repository
        self.children = children
        self.models = tuple(m for m in args.models.split(",") if m)
        self.levels = [int(c) for c in args.concurrency.split(",") if c]
        self.api_key = "bench-" + secrets.token_hex(8)
        self.peers: list[Peer] = []
        self.notes: list[str] = []
        self.spans_exported: int | None = None
        self.triton_version = ""
        self.threads: dict[str, tuple[int, int]] = {}
        self.providers: dict[str, str] = {}
        self.pinned: set[str] = set()  # models whose instances the worker pins to cores
        self.ort_sweep: dict[str, list[bare_ort.BatchThroughput]] = {}

    # ----- start-up -----

    def start_mesh(self, name: str, env: dict[str, str] | None, repository: Path | None = None) -> tuple[Peer, Peer]:
        """Registry + workers + gateway with the real CLI; returns (first worker direct, gateway) peers."""
        registry_port = free_port()
        registry = self.children.meshserve(f"{name}-registry", "registry", "--port", str(registry_port), env=env)
        registry_url = f"consul://127.0.0.1:{registry_port}"

        def registry_up() -> bool:
            registry.check_alive()
            return _port_open(registry_port)

        wait_until(registry_up, 30, f"{name} registry on port {registry_port}")
        workers = []
        for index in range(self.args.mesh_workers):
            port = free_port()
            workers.append(
                (
                    port,
                    self.children.meshserve(
                        f"{name}-worker{index}",
                        "worker",
                        "--model-repository",
                        str(repository or self.repository),
                        "--registry",
                        registry_url,
                        "--port",
                        str(port),
                        "--host",
                        "127.0.0.1",
                        "--advertise-address",
                        "127.0.0.1",
                        "--metrics-port",
                        "0",
                        "--log-level",
                        "info",
                        env=env,
                    ),
                )
            )
        gateway_port = free_port()
        gateway = self.children.meshserve(
            f"{name}-gateway",
            "gateway",
            "--registry",
            registry_url,
            "--port",
            str(gateway_port),
            "--host",
            "127.0.0.1",
            "--api-key",
            self.api_key,
            "--metrics-port",
            str(free_port()),
            "--processes",
            str(self.args.gateway_processes),
            "--log-level",
            "warning",
            env=env,
        )
        first_port, first_worker = workers[0]
        direct = Peer(WORKER, f"127.0.0.1:{first_port}", self.models, {"worker": first_worker})
        processes = {"gateway": gateway, "registry": registry}
        processes.update({f"worker{i}": child for i, (_, child) in enumerate(workers)})
        mesh = Peer(name, f"127.0.0.1:{gateway_port}", self.models, processes, api_key=self.api_key)
        return direct, mesh

    def worker_threads(self, worker: Child, timeout_s: float = 120.0) -> dict[str, tuple[int, int]]:
        """Each model's (intra-op threads, instances), from the worker's load log lines (its policy may change);
        also records each model's provider, which bare ORT then uses too."""
        found: dict[str, tuple[int, int]] = {}

        def all_found() -> bool:
            worker.check_alive()
            output = worker.output()
            for model, threads, instances in WORKER_THREADS_LINE.findall(output):
                found[model] = (int(threads), int(instances or 1))
            # On a GPU host the models run on CUDA: no CPU thread choice to log.
            for model, provider in worker_providers(output).items():
                self.providers[model] = provider
                if provider != CPU and model not in found:  # the GPU does the work: one thread per instance feeds it
                    found[model] = (1, load_model_config(self.repository / model).instance_count)
            self.pinned = set(WORKER_PINNED_LINE.findall(output))
            return all(model in found for model in self.models)

        try:
            wait_until(all_found, timeout_s, "the worker's intra-op thread choice per model")
        except TimeoutError:
            fallback = (os.cpu_count() or 1, 1)
            self.notes.append(f"worker thread choice not logged; Triton and bare ORT use {fallback[0]} thread(s)")
            return {model: found.get(model, fallback) for model in self.models}
        return {model: found[model] for model in self.models}

    def start_bare_proxy(self, direct: Peer) -> Peer:
        """`bench/bare_proxy.py` in front of the mesh's worker, for the transport model only."""
        port = free_port()
        child = self.children.start(
            BARE_PROXY, [sys.executable, "-m", "bench.bare_proxy", "--port", str(port), "--upstream", direct.url]
        )
        child.wait_for_output(BARE_PROXY_READY, 30)
        return Peer(BARE_PROXY, f"127.0.0.1:{port}", (TRANSPORT_MODEL,), {BARE_PROXY: child})

    def start_triton(self) -> Peer:
        grpc_port = free_port()
        argv = [str(self.args.triton_python), "-m", "bench.triton_server", "--model-repository", str(self.repository)]
        for model in self.models:
            threads, instances = self.threads.get(model, (os.cpu_count() or 1, 1))
            argv += ["--model", model, "--threads", f"{model}={threads}", "--instances", f"{model}={instances}"]
        argv += [
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--max-batch-size",
            str(self.args.triton_default_max_batch),
            "--max-queue-delay-us",
            str(self.args.triton_default_delay_us),
        ]
        child = self.children.start("triton", argv)
        return Peer(TRITON, f"127.0.0.1:{grpc_port}", self.models, {"triton": child})

    async def connect(self, peer: Peer, timeout_s: float = 180.0) -> None:
        """A client per peer, once every model answers ready through it."""
        peer.client = TritonClientLoad(peer.url, peer.api_key)

        def alive() -> None:
            for child in peer.processes.values():
                child.check_alive()

        for model in peer.models:
            await peer.client.wait_ready(model, timeout_s, alive)

    async def verify_outputs(self, peer: Peer, model: str, feeds: dict[str, np.ndarray], expected: list) -> None:
        assert peer.client is not None
        names = [o.name for o in expected[1]]
        try:
            got = await peer.client.infer(model, feeds, names)
        except Exception as exc:
            raise RuntimeError(f"{peer.name} at {peer.url}: {model} did not answer correctly: {exc!r}") from exc
        on_gpu = self.providers.get(model, CPU) != CPU and peer.name != TRITON  # Triton's ORT runs on the CPU
        check_outputs_agree(
            expected[0],
            got,
            f"{peer.name} {model} output differs from in-process ONNX Runtime",
            GPU_TOLERANCE if on_gpu else CPU_TOLERANCE,
        )

    # ----- measurement -----

    async def measure(self) -> list[Point]:
        feeds, expected = {}, {}
        for model in self.models:
            session = bare_ort.session(bare_ort.model_path(self.repository / model), os.cpu_count() or 1)
            feeds[model] = bare_ort.random_inputs(session, 1)
            expected[model] = (session.run(None, feeds[model]), session.get_outputs())  # type: ignore[attr-defined]
        for peer in self.peers:
            for model in peer.models:
                await self.verify_outputs(peer, model, feeds[model], expected[model])
        points = []
        total = self.args.rounds * sum(len(self._peers_for(m, c)) for m in self.models for c in self.levels)
        done = 0
        for round_index in range(self.args.rounds):
            for model in self.models:
                for concurrency in self.levels:
                    peers = self._peers_for(model, concurrency)
                    shift = round_index % len(peers)
                    for peer in peers[shift:] + peers[:shift]:
                        if peer is None:
                            point = await self._bare_ort_point(model, concurrency, round_index)
                        else:
                            point = await self._point(peer, model, feeds[model], concurrency, round_index)
                        points.append(point)
                        done += 1
                        r = points[-1].result
                        figures = (
                            f"{r.throughput:8.1f} samples/s"
                            if peer is None
                            else f"{r.throughput:8.1f} req/s  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms"
                        )
                        print(
                            f"[{done}/{total}] round {round_index + 1} {model:7} c={concurrency:<3} {point.peer:13} "
                            + figures
                            + (f"  errors {r.errors}" if r.errors else ""),
                            flush=True,
                        )
        return points

    def _peers_for(self, model: str, concurrency: int) -> list[Peer | None]:
        """The peers loaded at this point; None stands for bare ONNX Runtime at the sweep's best configuration,
        a peer at the compute-bound model's top concurrency (issue 2's compute limit)."""
        # Tracing cost (issue 6) and the busy waits' gain are measured on the transport-bound model only.
        transport_only = (MESH_TRACED, MESH_NO_BUSY_WAIT)
        peers: list[Peer | None] = [
            p for p in self.peers if model in p.models and (p.name not in transport_only or model == TRANSPORT_MODEL)
        ]
        if model == COMPUTE_MODEL and concurrency == max(self.levels) and self.ort_sweep.get(model):
            peers.append(None)
        return peers

    async def _bare_ort_point(self, model: str, concurrency: int, round_index: int) -> Point:
        """The sweep's best configuration for one round's duration, in a thread (it blocks while it runs)."""
        best = bare_ort.best(self.ort_sweep[model])
        started = time.process_time()
        runs = await asyncio.to_thread(
            bare_ort.measure,
            self.repository / model,
            [best.batch_size],
            self.args.duration,
            best.threads,
            best.instances,
            best.provider,
            best.pinned,
        )
        cpu_s = time.process_time() - started
        result = runs[0]
        samples = result.runs * result.batch_size
        nan = float("nan")
        level = LevelResult(concurrency, self.args.duration, samples, {}, result.samples_per_s, nan, nan, nan, nan, nan)
        # The bench process's CPU over the whole call (sessions, warm-up, runs) per sample measured.
        return Point(BARE_ORT, model, concurrency, round_index, level, {BARE_ORT: cpu_s / max(samples, 1) * 1000.0})

    async def _point(
        self, peer: Peer, model: str, feeds: dict[str, np.ndarray], concurrency: int, round_index: int
    ) -> Point:
        assert peer.client is not None
        return await measure_point(
            peer.name,
            peer.client,
            peer.processes,
            model,
            feeds,
            concurrency,
            round_index,
            self.args.duration,
            self.args.warmup,
        )


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def sweep_bare_ort(bench: Bench, batch_sizes: Sequence[int]) -> dict[str, list[bare_ort.BatchThroughput]]:
    """Bare ONNX Runtime per model at every batch size, in the worker's layout and in one session with all its
    threads (and pinned, when the worker pins); the servers are up but idle."""
    seconds = bench.args.ort_seconds
    sweep = {}
    for model in bench.models:
        threads, instances = bench.threads.get(model, (os.cpu_count() or 1, 1))
        provider = bench.providers.get(model, CPU)
        model_dir = bench.repository / model
        results = bare_ort.measure(model_dir, batch_sizes, seconds, threads, instances, provider)
        if instances > 1:
            if model in bench.pinned:  # as the worker runs them, and (above) as the kernel would place them
                results += bare_ort.measure(model_dir, batch_sizes, seconds, threads, instances, provider, pinned=True)
            results += bare_ort.measure(model_dir, batch_sizes, seconds, threads * instances, provider=provider)
        best = bare_ort.best(results)
        print(f"bare ORT {model}: best batch {best.batch_size}: {best.samples_per_s:.1f} samples/s", flush=True)
        sweep[model] = results
    return sweep


async def run_peers(bench: Bench) -> list[Point]:
    for peer in bench.peers:
        await bench.connect(peer)
    triton = next((p for p in bench.peers if p.name == TRITON), None)
    if triton is not None and triton.client is not None:
        meta = await triton.client.client.get_server_metadata()
        bench.triton_version = meta.version
    try:
        return await bench.measure()
    finally:
        for peer in bench.peers:
            if peer.client is not None:
                await peer.client.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_cleanly_on_sigterm()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    work = Path(tempfile.mkdtemp(prefix="meshserve-bench-"))
    log_dir = args.log_dir or work / "logs"
    repository = args.model_repository
    if repository is None:
        from meshserve.demo_models import write_demo_repository

        repository = work / "models"
        write_demo_repository(repository)
    print(f"bench: models in {repository}, logs in {log_dir}", flush=True)

    receiver_totals = ""
    with Children(log_dir) as children:
        bench = Bench(args, repository, children)
        receiver: Child | None = None
        try:
            direct, mesh = bench.start_mesh(MESH, env=None)
            bench.peers += [direct, mesh]
            # Triton and bare ORT get the intra-op threads the worker chose per model.
            bench.threads = bench.worker_threads(direct.processes["worker"])
            if not args.no_bare_proxy and TRANSPORT_MODEL in bench.models:
                bench.peers.append(bench.start_bare_proxy(direct))
            if not args.no_poll_peer:
                _, no_poll = bench.start_mesh(MESH_NO_POLL, env={"MESHSERVE_LIGHT_LOAD_POLL_US": "0"})
                bench.peers.append(no_poll)
            if not args.no_busy_wait_peer and TRANSPORT_MODEL in bench.models:
                plain = without_busy_wait(repository, work / "no-busy-wait", [TRANSPORT_MODEL])
                _, no_busy_wait = bench.start_mesh(
                    MESH_NO_BUSY_WAIT, env={"MESHSERVE_HOP_BUSY_WAIT_US": "0"}, repository=plain
                )
                no_busy_wait.models = (TRANSPORT_MODEL,)  # its repository holds no other model
                bench.peers.append(no_busy_wait)
            triton = None
            if not args.no_triton and any(provider != CPU for provider in bench.providers.values()):
                bench.notes.append(
                    "the worker runs on the GPU, Triton's callable on the CPU (its venv has the CPU build of ONNX "
                    "Runtime): ratios to Triton compare unlike devices"
                )
            if not args.no_triton:
                try:
                    triton = bench.start_triton()
                except OSError as exc:
                    bench.notes.append(f"Triton could not be started ({args.triton_python}): {exc}")
            if not args.no_tracing:
                receiver_port = free_port()
                receiver = children.start(
                    "otlp-receiver", [sys.executable, "-m", "bench.otlp_receiver", "--port", str(receiver_port)]
                )
                receiver.wait_for_output(OTLP_READY, 30)
                tracing_env = {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
                    "OTEL_EXPORTER_OTLP_INSECURE": "true",
                    **sampler_env(args.tracing_ratio),
                }
                _, traced = bench.start_mesh(MESH_TRACED, env=tracing_env)
                traced.processes["otlp-receiver"] = receiver
                bench.peers.append(traced)
            if triton is not None:
                try:
                    triton.processes["triton"].wait_for_output(TRITON_READY, 240)
                    bench.peers.append(triton)
                except (RuntimeError, TimeoutError) as exc:
                    # The mesh's own numbers are still worth recording; the report says Triton is missing.
                    triton.processes["triton"].stop()
                    bench.notes.append(f"Triton did not start, its columns are missing: {str(exc).splitlines()[0]}")
                    print(f"bench: {exc}", file=sys.stderr, flush=True)
            bench.ort_sweep = sweep_bare_ort(bench, [int(b) for b in args.ort_batches.split(",") if b])
            points = asyncio.run(run_peers(bench))
        except BaseException:
            print(f"bench failed; children's logs in {log_dir}", file=sys.stderr, flush=True)
            raise
        if receiver is not None:
            receiver.stop()
            receiver_totals = next(
                (line for line in receiver.output().splitlines() if line.startswith("SPANS ")), "no totals"
            )
    command = "python -m bench.run_all " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    run = {
        "command": command.strip(),
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine(),
        "versions": {
            **versions(),
            **({} if args.no_triton else triton_venv_versions(args.triton_python)),
            "Triton server": bench.triton_version,
        },
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": bench.levels,
            "mesh_workers": args.mesh_workers,
            "gateway_processes": args.gateway_processes,
            "triton_default_delay_us": args.triton_default_delay_us,
            "intra_op_threads": {m: {"threads": t, "instances": i} for m, (t, i) in bench.threads.items()},
            "providers": bench.providers,
            "tracing_ratio": args.tracing_ratio,
        },
        "otlp_receiver": receiver_totals,
        "notes": bench.notes,
        "points": [{**dataclasses.asdict(p), "result": p.result.to_dict()} for p in points],
        "bare_ort": {m: [dataclasses.asdict(r) for r in rs] for m, rs in bench.ort_sweep.items()},
    }
    markdown = render_markdown(run)
    for path in (args.json, args.markdown):
        path.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(run, indent=1))
    args.markdown.write_text(markdown)
    print(markdown)
    print(f"wrote {args.markdown} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
