"""`meshserve model rollout|rollback`: routing config in Consul KV (canaries, pins, rollbacks)."""

from __future__ import annotations

import typer


def register(model_app: typer.Typer) -> None:
    """Adds rollout/rollback to the `model` command group."""
