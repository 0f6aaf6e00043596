"""`meshserve ...`: the command-line entry point.

Every flag also reads a `MESHSERVE_<NAME>` environment variable (flags win);
see `meshserve.settings.load`.
"""

from __future__ import annotations

import typer

from meshserve.commands import (
    bench,
    demo_models,
    gateway,
    infer,
    keys,
    mesh,
    model,
    registry,
    routes,
    status,
    up,
    worker,
)

app = typer.Typer(
    name="meshserve",
    help="A gRPC serving mesh for ONNX models.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

for command_module in (up, registry, worker, gateway, infer, status, bench, demo_models, keys, model, mesh):
    command_module.register(app)
routes.register(model.model_app)


@app.callback()
def _root() -> None:
    """A gRPC serving mesh for ONNX models."""


@app.command()
def version() -> None:
    """Prints the meshserve version."""
    from meshserve import __version__

    typer.echo(__version__)


def main() -> None:
    app()
