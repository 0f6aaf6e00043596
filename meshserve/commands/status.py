"""`meshserve status`: the workers the registry knows, their models, health, device and load."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command(name="status")(status)


_STYLE = {"passing": "green", "warning": "yellow", "critical": "red", "maintenance": "magenta"}


def status(
    registry: str = typer.Option(
        None, "--registry", envvar="MESHSERVE_REGISTRY", help="consul://HOST:PORT (default: CONSUL_HTTP_ADDR)"
    ),
    service: str = typer.Option("meshserve-worker", "--service", help="Service name the workers register as"),
) -> None:
    """Lists workers (or, with --service meshserve-gateway, gateways) with their models, check status, device
    and load. Exits 1 when none is passing, 2 when the registry cannot be reached."""
    import asyncio

    from rich.console import Console
    from rich.table import Table

    from registry.blocking import RegistryErrors
    from registry.inventory import list_instances
    from registry.url import RegistryURLError

    console = Console()
    try:
        instances = asyncio.run(list_instances(registry, service))
    except RegistryURLError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except RegistryErrors as exc:
        console.print(
            f"[red]error:[/red] registry {registry or '(CONSUL_HTTP_ADDR)'} unreachable: {exc or type(exc).__name__}"
        )
        raise typer.Exit(2) from None

    table = Table(title=f"{service}: {sum(i.passing for i in instances)} of {len(instances)} passing")
    # An operator copies addresses and ids from here: on a narrow terminal (80 columns when piped)
    # the models column wraps instead of these being cut short.
    for column, values in (
        ("address", [health.instance.target for health in instances]),
        ("id", [health.instance.id for health in instances]),
    ):
        table.add_column(column, no_wrap=True, min_width=max(map(len, values), default=len(column)))
    for column in ("models", "status", "device", "load"):
        table.add_column(column)
    for health in instances:
        inst = health.instance
        models = ", ".join(f"{mv.name}:{mv.version}" for mv in sorted(inst.models)) or "-"
        load = f"queue {health.queue_depth:g}" if health.queue_depth is not None else inst.meta.get("load", "-")
        style = _STYLE.get(health.status, "")
        table.add_row(
            inst.target, inst.id, models, f"[{style}]{health.status}[/{style}]", inst.meta.get("device", "-"), load
        )
    console.print(table)
    if not any(health.passing for health in instances):
        what = "worker" if service == "meshserve-worker" else f"{service} instance"
        console.print(f"[red]no {what} is passing[/red]")
        raise typer.Exit(1)
