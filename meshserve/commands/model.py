"""`meshserve model ...`: model lifecycle tooling."""

from __future__ import annotations

import typer

model_app = typer.Typer(help="Model lifecycle: convert, optimize, quantize, validate, publish, rollout, rollback.")


def register(app: typer.Typer) -> None:
    """Adds the `model` command group to the CLI."""
    app.add_typer(model_app, name="model")
