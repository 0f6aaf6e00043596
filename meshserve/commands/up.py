"""`meshserve up`: registry, workers and gateway on one machine, with one command."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command(name="up")(up)


def up(
    workers: int = typer.Option(None, help="Worker processes [default: 2]"),
    port: int = typer.Option(None, help="Gateway port [default: 8001]"),
    model_repository: Path = typer.Option(None, help="Model repository; the demo models when omitted"),
    api_key: str = typer.Option(None, help="API key clients use; generated when omitted"),
    auth_file: Path = typer.Option(None, help="Auth file for more tenants/keys (`meshserve keys create`); live reload"),
    registry_port: int = typer.Option(None, help="Embedded registry port [default: 8500]"),
    metrics_port: int = typer.Option(None, help="Gateway /metrics port [default: 8002]"),
    log_level: str = typer.Option(None, help="debug, info, warning, error [default: info]"),
) -> None:
    """Starts the whole mesh (registry, workers, gateway) and stops it cleanly on Ctrl-C / SIGTERM."""
    import asyncio

    from pydantic import ValidationError

    from gateway.keyfile import new_key
    from meshserve.launcher import LaunchError, UpSettings, demo_repository, launch
    from meshserve.settings import load

    try:
        settings = load(
            UpSettings,
            workers=workers,
            port=port,
            model_repository=model_repository,
            api_key=api_key,
            auth_file=auth_file,
            registry_port=registry_port,
            metrics_port=metrics_port,
            log_level=log_level,
        )
    except ValidationError as exc:
        typer.echo(f"invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    if settings.model_repository is not None:
        repository = settings.model_repository
        if not repository.is_dir():
            typer.echo(f"model repository {repository} is not a directory", err=True)
            raise typer.Exit(2)
    else:
        typer.echo("preparing the demo models (first run only)...", err=True)
        repository = demo_repository()
    key = settings.api_key or new_key()
    if settings.auth_file is not None and not settings.auth_file.exists():
        settings.auth_file.write_text("tenants: {}\n")
    try:
        asyncio.run(launch(settings, repository, key, emit=lambda line: print(line, flush=True)))
    except LaunchError as exc:
        typer.echo(f"meshserve up: {exc}", err=True)
        raise typer.Exit(1) from None
