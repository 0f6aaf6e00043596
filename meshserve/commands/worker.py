"""`meshserve worker`: one worker serving a model repository over KServe v2 gRPC."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from worker.settings import WorkerSettings


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command(name="worker")(worker)


def worker(
    model_repository: Path = typer.Option(
        None, help="Model repository in Triton's layout [MESHSERVE_MODEL_REPOSITORY]"
    ),
    registry: str = typer.Option(None, help="consul://HOST:PORT to register in; unregistered when unset"),
    port: int = typer.Option(None, help="gRPC port; 0 picks a free one [default: 0]"),
    host: str = typer.Option(None, help="Address to bind [default: 0.0.0.0]"),
    advertise_address: str = typer.Option(None, help="Address registered for others to dial"),
    metrics_port: int = typer.Option(None, help="Prometheus /metrics port; 0 picks a free one [default: 0]"),
    log_level: str = typer.Option(None, help="debug, info, warning, error [default: info]"),
    max_message_size: int = typer.Option(None, help="Largest gRPC message in bytes [default: 64 MiB]"),
    drain_grace: float = typer.Option(None, help="Seconds in-flight work may take after SIGTERM [default: 30]"),
    drain_delay: float = typer.Option(None, help="Seconds to keep serving after NOT_SERVING [default: 1]"),
    watch_interval: float = typer.Option(
        None, help="Seconds between scans for new/removed model versions; 0 turns hot loading off [default: 1]"
    ),
    unload_drain: float = typer.Option(
        None, help="Seconds a removed version keeps answering after leaving the registry [default: 2]"
    ),
    inject_latency_ms: float = typer.Option(None, help="Test aid: fixed delay added to every request [default: 0]"),
    tls_cert: Path = typer.Option(None, help="PEM certificate chain: serve gRPC over TLS (with --tls-key)"),
    tls_key: Path = typer.Option(None, help="PEM private key of --tls-cert"),
    tls_client_ca: Path = typer.Option(
        None, help="PEM CA: require callers' certificates signed by it (mTLS; the registry then gets a TTL check)"
    ),
) -> None:
    """Serves the ONNX models of a repository; drains gracefully on SIGTERM/SIGINT."""
    import asyncio

    from pydantic import ValidationError

    from meshserve import logs, telemetry
    from meshserve.settings import load
    from worker.settings import WorkerSettings

    try:
        settings = load(
            WorkerSettings,
            model_repository=model_repository,
            registry=registry,
            port=port,
            host=host,
            advertise_address=advertise_address,
            metrics_port=metrics_port,
            log_level=log_level,
            max_message_size=max_message_size,
            drain_grace=drain_grace,
            drain_delay=drain_delay,
            watch_interval=watch_interval,
            unload_drain=unload_drain,
            inject_latency_ms=inject_latency_ms,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
        )
    except ValidationError as exc:
        typer.echo(f"invalid worker settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    logs.configure("worker", settings.log_level)
    tracing = telemetry.configure_tracing("worker")
    try:
        asyncio.run(_serve(settings, tracing))
    except (RuntimeError, OSError, telemetry.MetricsPortInUse) as exc:
        typer.echo(f"worker failed: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        telemetry.shutdown()


async def _serve(settings: WorkerSettings, tracing: bool) -> None:
    from meshserve.commands import freeze_startup_objects
    from worker.server import WorkerServer

    server = WorkerServer(settings, tracing=tracing)
    server.install_signal_handlers()
    try:
        await server.start()
    except BaseException:
        await server.close()
        raise
    freeze_startup_objects()
    await server.wait_stopped()
