"""`meshserve gateway`: the authenticated public front door of the mesh."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from collections.abc import Callable
    from subprocess import Popen

    from gateway.settings import GatewaySettings


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command(name="gateway")(gateway)


def gateway(
    registry: str = typer.Option(
        None, help="consul://HOST:PORT to discover workers [default: consul://127.0.0.1:8500]"
    ),
    port: int = typer.Option(None, help="Public gRPC port [default: 8001]"),
    host: str = typer.Option(None, help="Address to bind [default: 0.0.0.0]"),
    advertise_address: str = typer.Option(
        None, help="Address registered in the registry [default: the bind host, or this host's address]"
    ),
    register: bool = typer.Option(
        None, "--register/--no-register", help="Register as meshserve-gateway in the registry [default: register]"
    ),
    auth_file: Path = typer.Option(None, help="Tenants, hashed API keys and JWT settings (YAML/JSON); reloaded live"),
    api_key: str = typer.Option(None, help="A single API key allowed to call every model"),
    tls_cert: Path = typer.Option(None, help="PEM certificate for TLS on the public port"),
    tls_key: Path = typer.Option(None, help="PEM private key for TLS on the public port"),
    worker_tls_ca: Path = typer.Option(None, help="CA of the workers' certificates: TLS to workers"),
    worker_tls_cert: Path = typer.Option(None, help="Client certificate for mTLS to workers"),
    worker_tls_key: Path = typer.Option(None, help="Client key for mTLS to workers"),
    processes: int = typer.Option(None, help="Gateway processes sharing the port (SO_REUSEPORT) [default: 1]"),
    metrics_port: int = typer.Option(None, help="Prometheus /metrics port; 0 picks a free one [default: 8002]"),
    drain_delay: float = typer.Option(
        None, help="Seconds to keep serving after SIGTERM while load balancers in front notice [default: 1]"
    ),
    drain_grace: float = typer.Option(None, help="Seconds in-flight requests may take after SIGTERM [default: 10]"),
    log_level: str = typer.Option(None, help="debug, info, warning, error [default: info]"),
) -> None:
    """Serves KServe v2 to clients and forwards requests to the workers found in the registry."""
    import asyncio

    from pydantic import ValidationError

    from gateway.server import PortInUse
    from gateway.settings import GatewaySettings
    from meshserve import logs, telemetry
    from meshserve.settings import load

    try:
        settings = load(
            GatewaySettings,
            registry=registry,
            port=port,
            host=host,
            advertise_address=advertise_address,
            self_register=register,
            auth_file=auth_file,
            api_key=api_key,
            tls_cert=tls_cert,
            tls_key=tls_key,
            worker_tls_ca=worker_tls_ca,
            worker_tls_cert=worker_tls_cert,
            worker_tls_key=worker_tls_key,
            processes=processes,
            metrics_port=metrics_port,
            drain_delay=drain_delay,
            drain_grace=drain_grace,
            log_level=log_level,
        )
    except ValidationError as exc:
        typer.echo(f"invalid gateway settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    logs.configure("gateway", settings.log_level)
    telemetry.configure_tracing("gateway")
    children = _spawn_siblings(settings) if settings.processes > 1 else []
    try:
        # Siblings drain alongside this process, not after it.
        asyncio.run(_serve(settings, on_stop=lambda: _signal_siblings(children)))
    except (PortInUse, telemetry.MetricsPortInUse, OSError, ValueError) as exc:
        typer.echo(f"gateway failed: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        _stop_siblings(children, settings.drain_delay + settings.drain_grace + 10)
        telemetry.shutdown()


def _spawn_siblings(settings: GatewaySettings) -> list[Popen[bytes]]:
    """`--processes N`: N-1 more gateway processes on the same port (SO_REUSEPORT), each with its own metrics port."""
    import os
    import subprocess

    # The siblings share the first process's port and its one registry entry.
    env = {
        **os.environ,
        "MESHSERVE_PROCESSES": str(settings.processes),
        "MESHSERVE_SIBLING": "1",
        "MESHSERVE_SELF_REGISTER": "false",
    }
    args = list(sys.argv[1:])
    children: list[Popen[bytes]] = []
    if os.environ.get("MESHSERVE_SIBLING") == "1":
        return children
    for _ in range(settings.processes - 1):
        sibling_args = [arg for arg in _without_option(args, "--metrics-port") if arg != "--register"]
        command = [sys.executable, "-m", "meshserve", *sibling_args, "--metrics-port", "0"]
        children.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))
    return children


def _without_option(args: list[str], name: str) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out


def _signal_siblings(children: list[Popen[bytes]]) -> None:
    import signal

    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)


def _stop_siblings(children: list[Popen[bytes]], timeout_s: float) -> None:
    import subprocess

    _signal_siblings(children)  # a sibling that already had its SIGTERM ignores this one
    for child in children:
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()


async def _serve(settings: GatewaySettings, on_stop: Callable[[], None]) -> None:
    import asyncio
    import contextlib
    import signal

    from gateway.server import Gateway
    from meshserve import __version__, telemetry
    from meshserve.commands import freeze_startup_objects

    registry = telemetry.process_registry()
    metrics_server = (
        telemetry.start_metrics_server(registry, settings.metrics_port) if settings.metrics_port >= 0 else None
    )
    gateway = Gateway(
        settings,
        metrics_registry=registry,
        version=__version__,
        metrics_port=metrics_server.port if metrics_server is not None else None,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    # A stop must not wait for the start: with the registry unreachable, start() waits up to
    # MESHSERVE_REGISTRY_FIRST_READ_S for its first read, as long as an orchestrator's stop timeout.
    starting = asyncio.create_task(gateway.start(), name="gateway-start")
    stop_requested = asyncio.create_task(stopping.wait(), name="stop-requested")
    try:
        await asyncio.wait({starting, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a port in use, say, ends here
            freeze_startup_objects()
            await stop_requested
            on_stop()
            await gateway.drain()
    finally:
        for task in (starting, stop_requested):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await gateway.stop()
        if metrics_server is not None:
            metrics_server.close()
