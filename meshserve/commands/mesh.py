"""`meshserve mesh workers|models|route`: the gateway's `meshserve.v1.MeshAdmin`, from the command line.

What the gateway itself sees and applies, over its public port with an API
key: no access to the registry needed (`meshserve status` and `meshserve model
rollout` talk to Consul directly instead).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

T = TypeVar("T")

mesh_app = typer.Typer(
    help="What a gateway balances over, and its routes (meshserve.v1.MeshAdmin).", no_args_is_help=True
)

URL = typer.Option("127.0.0.1:8001", envvar="MESHSERVE_URL", help="Gateway HOST:PORT")
API_KEY = typer.Option(None, envvar="MESHSERVE_API_KEY", help="Sent as 'authorization: Bearer KEY'")
TLS_CA = typer.Option(None, help="CA certificate (PEM) of a gateway serving TLS; plaintext when omitted")


def register(app: typer.Typer) -> None:
    """Adds the `mesh` command group to the CLI."""
    app.add_typer(mesh_app, name="mesh")


def _call(url: str, api_key: str | None, tls_ca: Path | None, rpc: Callable[[Any, tuple], T]) -> T:
    """Runs `rpc(stub, metadata)`; a gRPC error is printed with its code and exits 1."""
    import grpc

    from meshserve.commands import bearer, client_channel
    from protos import mesh_pb2_grpc

    with client_channel(url, tls_ca) as channel:
        try:
            return rpc(mesh_pb2_grpc.MeshAdminStub(channel), bearer(api_key))
        except grpc.RpcError as exc:
            typer.echo(f"{exc.code().name}: {exc.details()}", err=True)  # type: ignore[attr-defined]
            raise typer.Exit(1) from None


@mesh_app.command()
def workers(url: str = URL, api_key: str = API_KEY, tls_ca: Path = TLS_CA) -> None:
    """The workers the gateway balances over: address, models, state, and load."""
    from rich.console import Console
    from rich.table import Table

    from protos import mesh_pb2

    reply = _call(
        url,
        api_key,
        tls_ca,
        lambda stub, auth: stub.ListWorkers(mesh_pb2.ListWorkersRequest(), metadata=auth, timeout=10),
    )
    table = Table(title=f"workers behind {url}: {len(reply.workers)}")
    for column in ("address", "id"):
        table.add_column(column, no_wrap=True)
    for column in ("models", "state", "in flight here", "queue"):
        table.add_column(column)
    for worker in reply.workers:
        row = (worker.address, worker.id, ", ".join(worker.models), worker.state, worker.in_flight, worker.queue_depth)
        table.add_row(*(str(cell) for cell in row))
    Console().print(table)


@mesh_app.command()
def models(url: str = URL, api_key: str = API_KEY, tls_ca: Path = TLS_CA) -> None:
    """The models the gateway can route to, their versions, and how many workers serve each."""
    from protos import mesh_pb2

    reply = _call(
        url,
        api_key,
        tls_ca,
        lambda stub, auth: stub.ListModels(mesh_pb2.ListModelsRequest(), metadata=auth, timeout=10),
    )
    for model in reply.models:
        typer.echo(f"{model.name}: versions {', '.join(model.versions)} on {model.workers} worker(s)")


@mesh_app.command()
def route(
    model: str = typer.Argument(..., help="Model name"),
    set_weights: list[str] = typer.Option(
        None, "--set", help="VERSION=WEIGHT, repeatable (e.g. --set 1=90 --set 2=10); needs an admin key"
    ),
    url: str = URL,
    api_key: str = API_KEY,
    tls_ca: Path = TLS_CA,
) -> None:
    """Prints MODEL's route as the gateway applies it; with --set, replaces its weights first."""
    from gateway.routes import version_order
    from protos import mesh_pb2

    if set_weights:
        weights: dict[str, int] = {}
        for spec in set_weights:
            version, sep, weight = spec.partition("=")
            if not sep or not version or not weight.isdigit():
                typer.echo(f"--set takes VERSION=WEIGHT (a whole number), not {spec!r}", err=True)
                raise typer.Exit(2)
            weights[version] = int(weight)
        request = mesh_pb2.SetRouteRequest(route=mesh_pb2.Route(model=model, weights=weights))
        reply = _call(url, api_key, tls_ca, lambda stub, auth: stub.SetRoute(request, metadata=auth, timeout=10))
    else:
        get = mesh_pb2.GetRouteRequest(model=model)
        reply = _call(url, api_key, tls_ca, lambda stub, auth: stub.GetRoute(get, metadata=auth, timeout=10))
    if reply.weights:
        ordered = sorted(reply.weights.items(), key=lambda item: version_order(item[0]))
        typer.echo(f"{model}: " + ", ".join(f"version {version} weight {weight}" for version, weight in ordered))
    else:
        typer.echo(f"{model}: no route; the newest served version answers")
