"""`meshserve keys create`: a new API key for a tenant, printed once; the auth file keeps only its hash."""

from __future__ import annotations

from pathlib import Path

import typer

keys_app = typer.Typer(help="API keys for the gateway's auth file.", no_args_is_help=True)

DEFAULT_AUTH_FILE = Path("meshserve-auth.yaml")


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def create(
    tenant: str = typer.Option(..., help="Tenant the key belongs to (created when new)"),
    models: list[str] = typer.Option(None, help="Model glob the tenant may call, e.g. 'digits*' (repeatable)"),
    rate_limit: float = typer.Option(None, help="Requests per second per gateway process (omit: unlimited)"),
    admin: bool = typer.Option(False, "--admin", help="The tenant may also change routes (MeshAdmin.SetRoute)"),
    auth_file: Path = typer.Option(
        None, envvar="MESHSERVE_AUTH_FILE", help=f"Auth file to update [default: ./{DEFAULT_AUTH_FILE}]"
    ),
) -> None:
    """Creates a key, stores its SHA-256 in the auth file and prints the key (it cannot be shown again)."""
    from gateway.keyfile import add_key

    path = auth_file or DEFAULT_AUTH_FILE
    globs = [g for spec in models or [] for g in spec.split(",") if g]
    try:
        key = add_key(path, tenant, models=globs or None, rate_limit=rate_limit, admin=admin)
    except (OSError, ValueError) as exc:
        typer.echo(f"cannot update {path}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(key)
    typer.echo(
        f"# tenant {tenant!r} in {path}; this key is shown once, only its SHA-256 is stored. "
        f"Use it as 'authorization: Bearer <key>'.",
        err=True,
    )
