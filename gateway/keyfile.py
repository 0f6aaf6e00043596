"""Writing the auth file: new API keys are generated here and only their SHA-256 is stored."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import yaml

from gateway.auth import hash_key, parse_auth_file

KEY_PREFIX = "msk_"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def add_key(
    path: Path, tenant: str, *, models: list[str] | None = None, rate_limit: float | None = None, admin: bool = False
) -> str:
    """Adds a fresh key to `tenant` (creating the tenant and the file as needed); returns the key.

    The file is replaced atomically (write + rename) so a gateway reloading it
    never reads half a file.
    """
    raw: dict[str, Any] = {}
    if path.exists():
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError("the auth file is not a mapping")
    tenants = raw.setdefault("tenants", {}) or {}
    raw["tenants"] = tenants
    spec = tenants.setdefault(tenant, {}) or {}
    tenants[tenant] = spec
    if models:
        spec["models"] = list(models)
    spec.setdefault("models", ["*"])
    if rate_limit is not None:
        spec["rate_limit"] = rate_limit
    if admin:
        spec["admin"] = True
    key = new_key()
    spec.setdefault("keys", [])
    spec["keys"] = [*(spec["keys"] or []), {"sha256": hash_key(key)}]
    _write_atomically(path, yaml.safe_dump(raw, sort_keys=False))
    parse_auth_file(path)  # what we wrote must load
    return key


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
