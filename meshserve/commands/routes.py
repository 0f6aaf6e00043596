"""`meshserve model rollout|rollback`: routing config in Consul KV (canaries, pins, rollbacks)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import typer

T = TypeVar("T")

DEFAULT_REGISTRY = "consul://127.0.0.1:8500"
ROUTES_PREFIX = "meshserve/routes/"


def register(model_app: typer.Typer) -> None:
    """Adds rollout/rollback to the `model` command group."""
    model_app.command("rollout")(rollout)
    model_app.command("rollback")(rollback)


def rollout(
    model: str = typer.Argument(..., help="Model name"),
    version: str = typer.Option(..., help="Version to send traffic to"),
    weight: int = typer.Option(100, help="Percent of the traffic for VERSION; 100 pins it"),
    registry: str = typer.Option(DEFAULT_REGISTRY, envvar="MESHSERVE_REGISTRY", help="consul://HOST:PORT"),
) -> None:
    """Sends WEIGHT% of MODEL's traffic (requests naming no version) to VERSION; gateways apply it within 1 s."""

    from gateway.routes import read_route, write_route
    from gateway.routes import rollout as plan_rollout

    async def change() -> dict[str, int]:
        current, index = await read_route(registry, ROUTES_PREFIX, model)
        stable = None
        if current is None or not current.weights:
            stable = await _stable_version(registry, model, exclude=version)
        route = plan_rollout(current, version, weight, stable)
        await write_route(registry, ROUTES_PREFIX, model, route, index)
        return dict(route.weights)

    weights = _run(change())
    typer.echo(f"{model}: {_describe(weights)}")


def rollback(
    model: str = typer.Argument(..., help="Model name"),
    registry: str = typer.Option(DEFAULT_REGISTRY, envvar="MESHSERVE_REGISTRY", help="consul://HOST:PORT"),
) -> None:
    """Restores MODEL's route from before the last rollout, in one step."""
    from gateway.routes import read_route, write_route
    from gateway.routes import rollback as plan_rollback

    async def change() -> dict[str, int]:
        current, index = await read_route(registry, ROUTES_PREFIX, model)
        route = plan_rollback(current)
        await write_route(registry, ROUTES_PREFIX, model, route, index)
        return dict(route.weights)

    weights = _run(change())
    typer.echo(f"{model} rolled back: {_describe(weights)}")


def _describe(weights: dict[str, int]) -> str:
    return ", ".join(f"version {v} {w}%" for v, w in weights.items())


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    import asyncio

    import aiohttp

    try:
        return asyncio.run(coroutine)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        typer.echo(f"error: cannot reach the registry: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # py-consul raises its own exception types for HTTP errors
        typer.echo(f"error: registry request failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None


async def _stable_version(registry: str, model: str, exclude: str) -> str | None:
    """The newest version passing workers serve, other than the one being rolled out."""
    import asyncio

    from gateway.routes import newest
    from registry.discovery import ServiceWatcher

    watcher = ServiceWatcher(registry)
    try:
        async with asyncio.timeout(10):
            changes = await anext(watcher)
    finally:
        await watcher.close()
    versions = {mv.version for c in changes for mv in c.instance.models if mv.name == model and mv.version != exclude}
    return newest(versions) if versions else None
