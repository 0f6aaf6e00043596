"""`meshserve registry`: the embedded Consul-compatible agent for one machine."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command(name="registry")(registry)


def registry(
    port: int = typer.Option(None, "--port", help="HTTP port (0 picks a free one) [env MESHSERVE_REGISTRY_PORT; 8500]"),
    host: str = typer.Option(None, "--host", help="Address to bind [env MESHSERVE_REGISTRY_HOST; 127.0.0.1]"),
    metrics_port: int = typer.Option(None, "--metrics-port", help="Serve Prometheus /metrics on this port"),
    log_level: str = typer.Option(None, "--log-level", help="debug, info, warning, error [env MESHSERVE_LOG_LEVEL]"),
) -> None:
    """Runs the embedded registry agent (Consul HTTP API subset, in memory) until Ctrl-C or SIGTERM."""
    import asyncio

    from meshserve import logs
    from meshserve.settings import load
    from registry.agent.server import serve
    from registry.settings import AgentSettings

    settings = load(
        AgentSettings, registry_port=port, registry_host=host, metrics_port=metrics_port, log_level=log_level
    )
    logs.configure("registry", settings.log_level)
    asyncio.run(serve(settings))
