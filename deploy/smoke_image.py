"""Smoke test of the container image: the mesh as docker-compose.yml runs it, in real containers.

    python deploy/smoke_image.py [--build] [--device cpu|cuda] [--engine docker] [--image meshserve:DEVICE]

What it checks, on a private network and volume it creates and always removes:
- the image runs the CLI as the non-root service user (uid 10001);
- `meshserve demo-models /models` fills a fresh named volume (compose's `models` service);
- a registry, two workers with compose's worker command (`--port 8001 --metrics-port
  8002`, advertising their container address) and the gateway with an API key come up,
  and the image's HEALTHCHECK command reports each of them healthy;
- through the gateway's published port, with the stock tritonclient and the key, every
  demo model answers what ONNX Runtime in this process answers on the volume's files;
- one worker killed (SIGKILL) under 8 concurrent clients: no request fails;
- the other worker stopped (SIGTERM, compose's stop signal) drains and exits 0.

It also prints the execution provider each worker got per model: with `--device cuda` and
no GPU handed to the containers (`--run-flags "--gpus all"` hands them one), the CUDA image
must fall back to the CPU and still pass.

The registry here is `meshserve registry` (the embedded agent) under the name `consul`,
where compose runs a real Consul: the workers and the gateway get the same
`consul://consul:8500` either way. Needs the engine's CLI and this repository's dev
environment (tritonclient, onnxruntime). Not part of `make test`: building the image
downloads packages, and the tests reach nothing but loopback.

`--engine` takes a whole command prefix, and `--run-flags`/`--build-flags` add flags, for
hosts that need them. A rootful podman inside a sandbox without systemd, for example:

    python deploy/smoke_image.py --build \\
        --engine "podman --storage-driver vfs --runtime runc --cgroup-manager cgroupfs" \\
        --build-flags "--isolation chroot --format docker --pull=never" \\
        --run-flags "--init-path /usr/bin/tini --ulimit nofile=4096:4096 --ulimit nproc=4096:4096"
"""

from __future__ import annotations

import argparse
import asyncio
import io
import secrets
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench import bare_ort  # noqa: E402  (the repository root is on the path only now)
from bench.processes import free_port, wait_until, worker_providers  # noqa: E402
from bench.tritonclient_load import TritonClientLoad, check_outputs_agree  # noqa: E402

SERVICE_UID = "10001"
# Compose's commands, word for word (tests/unit/test_deploy_compose.py keeps them equal).
REGISTRY_URL = "consul://consul:8500"
WORKER_COMMAND = (
    "meshserve",
    "worker",
    "--model-repository",
    "/models",
    "--registry",
    REGISTRY_URL,
    "--port",
    "8001",
    "--metrics-port",
    "8002",
)
GATEWAY_COMMAND = ("meshserve", "gateway", "--registry", REGISTRY_URL, "--port", "8001", "--metrics-port", "8002")
MODELS_COMMAND = ("meshserve", "demo-models", "/models")
DEMO_MODELS = ("digits", "mlp784", "cnn")
RESILIENCE_CLIENTS = 8


class Engine:
    """`docker` or `podman` (with whatever flags this host needs) as a list of argv prefixes."""

    def __init__(self, prefix: str, run_flags: str) -> None:
        self.prefix = shlex.split(prefix)
        self.run_flags = shlex.split(run_flags)

    def __call__(self, *args: str, check: bool = True, capture: bool = True, timeout: float = 600) -> str:
        completed = subprocess.run([*self.prefix, *args], capture_output=capture, timeout=timeout, check=False)
        if check and completed.returncode != 0:
            detail = completed.stderr.decode(errors="replace")[-2000:] if capture else ""
            raise RuntimeError(f"{' '.join(args[:3])} ... exited {completed.returncode}: {detail}")
        return completed.stdout.decode(errors="replace").strip() if capture else ""

    def run(self, *args: str, detach: bool = True) -> str:
        return self("run", *(["-d"] if detach else ["--rm"]), "--init", *self.run_flags, *args)


def healthy(engine: Engine, container: str) -> bool:
    """The image's HEALTHCHECK command, run in the container as the engine would run it."""
    probe = [*engine.prefix, "exec", container, "python", "/opt/meshserve/healthcheck.py"]
    return subprocess.run(probe, capture_output=True, check=False, timeout=30).returncode == 0


def copy_models_out(engine: Engine, image: str, volume: str, destination: Path) -> None:
    """The volume's files, through a container (the volume may live where this process cannot read)."""
    archive = subprocess.run(
        [
            *engine.prefix,
            "run",
            "--rm",
            *engine.run_flags,
            "-v",
            f"{volume}:/models:ro",
            image,
            "tar",
            "-C",
            "/models",
            "-cf",
            "-",
            ".",
        ],
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(destination, filter="data")


async def check_answers(url: str, key: str, models_dir: Path) -> None:
    client = TritonClientLoad(url, key)
    try:
        for model in DEMO_MODELS:
            await client.wait_ready(model, 120.0)
            session = bare_ort.session(bare_ort.model_path(models_dir / model), 1)
            feeds = bare_ort.random_inputs(session, 1, seed=7)
            outputs = [out.name for out in session.get_outputs()]  # type: ignore[attr-defined]
            expected = session.run(outputs, feeds)  # type: ignore[attr-defined]
            got = await client.infer(model, feeds, outputs)
            check_outputs_agree(expected, got, f"{model} through the containerised mesh")
            print(f"ok: {model} through the gateway equals in-process ONNX Runtime")
    finally:
        await client.close()


async def load_while(url: str, key: str, models_dir: Path, action: Callable[[], None]) -> tuple[int, int]:
    """(requests, failures) of 8 closed-loop clients on mlp784, with `action` run in a thread mid-way."""
    client = TritonClientLoad(url, key)
    session = bare_ort.session(bare_ort.model_path(models_dir / "mlp784"), 1)
    feeds = bare_ort.random_inputs(session, 1)
    try:
        task = asyncio.create_task(client.run("mlp784", feeds, RESILIENCE_CLIENTS, 8.0, 0.0))
        await asyncio.sleep(3.0)
        await asyncio.to_thread(action)
        result = await task
        return result.requests, result.error_count
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="docker", help="command prefix: docker, podman, or either with flags")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the image's DEVICE build arg")
    parser.add_argument("--image", help="default: meshserve:DEVICE")
    parser.add_argument("--build", action="store_true", help="build the image from this repository first")
    parser.add_argument("--build-flags", default="", help="extra flags for `ENGINE build`")
    parser.add_argument("--run-flags", default="", help="extra flags for every `ENGINE run`")
    args = parser.parse_args(argv)
    args.image = args.image or f"meshserve:{args.device}"
    engine = Engine(args.engine, args.run_flags)
    if args.build:
        engine(
            "build",
            *shlex.split(args.build_flags),
            "--build-arg",
            f"DEVICE={args.device}",
            "-t",
            args.image,
            str(REPO_ROOT),
            capture=False,
            timeout=1800,
        )

    name = f"meshserve-smoke-{secrets.token_hex(3)}"
    key = secrets.token_hex(12)
    gateway_port = free_port()
    containers: list[str] = []
    engine("network", "create", name)
    engine("volume", "create", name)
    try:
        uid = engine.run(args.image, "id", "-u", detach=False)
        assert uid == SERVICE_UID, f"the image runs as uid {uid}, not the service user {SERVICE_UID}"
        print(f"ok: runs as uid {uid}")
        engine.run("-v", f"{name}:/models", args.image, *MODELS_COMMAND, detach=False)

        def start(role: str, command: Sequence[str], options: Sequence[str] = ()) -> str:
            container = f"{name}-{role}"
            engine.run("--name", container, "--network", name, *options, args.image, *command)
            containers.append(container)
            return container

        start(
            "consul",
            ("meshserve", "registry", "--host", "0.0.0.0", "--port", "8500"),
            options=("--network-alias", "consul"),
        )
        workers = [start(f"worker{i}", WORKER_COMMAND, options=("-v", f"{name}:/models:ro")) for i in range(2)]
        gateway = start(
            "gateway",
            GATEWAY_COMMAND,
            options=("-e", f"MESHSERVE_API_KEY={key}", "-p", f"127.0.0.1:{gateway_port}:8001"),
        )
        for container in (*workers, gateway):
            wait_until(lambda c=container: healthy(engine, c), 180, f"{container}'s HEALTHCHECK", interval_s=1.0)
            print(f"ok: {container} healthy")
        for worker in workers:
            logs = subprocess.run([*engine.prefix, "logs", worker], capture_output=True, check=False, timeout=60)
            providers = worker_providers((logs.stdout + logs.stderr).decode(errors="replace"))
            assert set(providers) == set(DEMO_MODELS), f"{worker} loaded {sorted(providers)}, not {DEMO_MODELS}"
            print(f"ok: {worker} serves " + ", ".join(f"{m} on {p}" for m, p in sorted(providers.items())))

        url = f"127.0.0.1:{gateway_port}"
        with tempfile.TemporaryDirectory() as scratch:
            models_dir = Path(scratch)
            copy_models_out(engine, args.image, name, models_dir)
            asyncio.run(check_answers(url, key, models_dir))
            requests, failures = asyncio.run(
                load_while(url, key, models_dir, lambda: engine("kill", "--signal", "KILL", workers[0]))
            )
        assert requests > 0 and failures == 0, f"{failures} of {requests} requests failed around the kill"
        print(f"ok: {workers[0]} killed under {RESILIENCE_CLIENTS} clients, {requests} requests, none failed")

        engine("stop", "-t", "30", workers[1], timeout=60)
        code = engine("inspect", "--format", "{{.State.ExitCode}}", workers[1])
        assert code == "0", f"{workers[1]} exited {code} after SIGTERM"
        print(f"ok: {workers[1]} drained and exited 0 on SIGTERM")
        print("image smoke test passed")
        return 0
    except Exception:
        for container in containers:
            print(f"--- {container} log tail ---", file=sys.stderr)
            subprocess.run([*engine.prefix, "logs", "--tail", "30", container], check=False)
        raise
    finally:
        for container in reversed(containers):
            engine("rm", "-f", container, check=False)
        engine("network", "rm", name, check=False)
        engine("volume", "rm", "-f", name, check=False)


if __name__ == "__main__":
    sys.exit(main())
