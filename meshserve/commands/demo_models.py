"""`meshserve demo-models DIR`: writes the demo model repository (offline, deterministic)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command(name="demo-models")(demo_models)


def demo_models(directory: Path = typer.Argument(..., help="Where to write the repository")) -> None:
    """Writes digits, mlp784 and cnn in Triton's layout and prints the digits accuracy."""
    from meshserve.demo_models import write_demo_repository_report

    report = write_demo_repository_report(directory)
    typer.echo(f"digits held-out accuracy: {report.digits_accuracy:.4f}")
    typer.echo(f"wrote digits, mlp784, cnn to {directory}")
