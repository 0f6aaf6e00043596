"""Who is calling, and may they call this model?

Tokens arrive as `authorization: Bearer <token>` metadata. A token is either
an API key, stored in the auth file only as its SHA-256 hex digest, or a JWT
(HS256 / RS256; `exp`, `nbf`, `aud` checked by pyjwt) whose tenant claim
names a tenant of the auth file. Each tenant lists the model globs it may call
and its rate limit.

The auth file (YAML or JSON)::

    tenants:
      acme:
        models: ["digits*", "mlp784"]
        rate_limit: 100        # requests per second per gateway process; omit for none
        burst: 200             # bucket size; defaults to max(1, rate_limit)
        admin: false           # true: may also change routes (MeshAdmin.SetRoute)
        keys:
          - sha256: 3f1c...    # written by `meshserve keys create`
    jwt:
      audience: meshserve
      hs256_secret: "..."      # and/or
      rs256_public_key: "-----BEGIN PUBLIC KEY-----..."   # or rs256_public_key_file: path
      tenant_claim: tenant     # default "tenant"

Verified tokens are cached (a dict lookup per request); the cache is dropped
whenever the auth file changes, so a removed key stops working at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import yaml

log = logging.getLogger(__name__)

BEARER = "bearer "
_TOKEN_CACHE_LIMIT = 10_000


class AuthError(Exception):
    """A request that must be refused, with the gRPC code and an actionable message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Tenant:
    name: str
    models: tuple[str, ...] = ("*",)
    rate_limit: float | None = None
    burst: float | None = None
    # May change the mesh (MeshAdmin.SetRoute), not only call it.
    admin: bool = False

    def allows(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


@dataclass(frozen=True)
class JwtConfig:
    audience: str | None = None
    hs256_secret: str | None = None
    rs256_public_key: str | None = None
    tenant_claim: str = "tenant"

    def key_for(self, algorithm: str) -> str:
        if algorithm == "HS256" and self.hs256_secret:
            return self.hs256_secret
        if algorithm == "RS256" and self.rs256_public_key:
            return self.rs256_public_key
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"JWT algorithm {algorithm!r} is not accepted here")


@dataclass(frozen=True)
class AuthConfig:
    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    key_hashes: Mapping[str, str] = field(default_factory=dict)  # sha256 hex -> tenant name
    jwt: JwtConfig | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def single_key_config(api_key: str) -> AuthConfig:
    """`--api-key KEY`: one tenant, every model, no rate limit."""
    tenant = Tenant("default", admin=True)  # the one key for everything
    return AuthConfig(tenants={tenant.name: tenant}, key_hashes={hash_key(api_key): tenant.name})


def parse_auth_file(path: Path) -> AuthConfig:
    """Reads an auth file; raises ValueError with a message naming what is wrong."""
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not valid YAML/JSON: {exc}") from exc
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with 'tenants' (and optionally 'jwt')")
    tenants: dict[str, Tenant] = {}
    key_hashes: dict[str, str] = {}
    for name, spec in (raw.get("tenants") or {}).items():
        spec = spec or {}
        models = spec.get("models", ["*"])
        if isinstance(models, str):
            models = [models]
        rate = spec.get("rate_limit")
        burst = spec.get("burst")
        tenants[name] = Tenant(
            name=str(name),
            models=tuple(str(m) for m in models),
            rate_limit=float(rate) if rate else None,
            burst=float(burst) if burst else None,
            admin=spec.get("admin") is True,
        )
        for key in spec.get("keys") or []:
            digest = key.get("sha256") if isinstance(key, dict) else key
            if not isinstance(digest, str) or len(digest) != 64:
                raise ValueError(f"{path}: tenant {name!r} has a key that is not a SHA-256 hex digest")
            key_hashes[digest.lower()] = str(name)
    jwt_config = None
    if raw.get("jwt"):
        spec = raw["jwt"]
        public_key = spec.get("rs256_public_key")
        if not public_key and spec.get("rs256_public_key_file"):
            public_key = (path.parent / spec["rs256_public_key_file"]).read_text()
        jwt_config = JwtConfig(
            audience=spec.get("audience"),
            hs256_secret=spec.get("hs256_secret"),
            rs256_public_key=public_key,
            tenant_claim=spec.get("tenant_claim", "tenant"),
        )
    return AuthConfig(tenants=tenants, key_hashes=key_hashes, jwt=jwt_config)


def merge(config: AuthConfig, extra: AuthConfig | None) -> AuthConfig:
    """`config` plus the tenants and keys of `extra` (e.g. `--api-key` beside an auth file)."""
    if extra is None:
        return config
    return AuthConfig(
        tenants={**extra.tenants, **config.tenants},
        key_hashes={**extra.key_hashes, **config.key_hashes},
        jwt=config.jwt or extra.jwt,
    )


class Authenticator:
    """Turns request metadata into a `Tenant`, or raises `AuthError`.

    `config=None` means authentication is off: every caller is the open tenant.
    """

    OPEN = Tenant("anonymous", admin=True)  # no authentication configured: nothing is guarded

    def __init__(self, config: AuthConfig | None) -> None:
        self._config = config
        self._tokens: dict[str, tuple[Tenant, float]] = {}  # token -> (tenant, valid until, wall clock)
        self._allowed: dict[tuple[str, str], bool] = {}

    @property
    def enabled(self) -> bool:
        return self._config is not None

    def replace(self, config: AuthConfig) -> None:
        self._config = config
        self._tokens = {}
        self._allowed = {}

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Tenant:
        if self._config is None:
            return self.OPEN
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value
                break
        if header is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "missing credentials: send 'authorization: Bearer <key>'")
        if isinstance(header, bytes):
            header = header.decode(errors="replace")
        if header[:7].lower() != BEARER or len(header) <= 7:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, "malformed authorization header: expected 'Bearer <key or JWT>'"
            )
        token = header[7:].strip()
        cached = self._tokens.get(token)
        if cached is not None and cached[1] > time.time():
            return cached[0]
        tenant, valid_until = self._verify(token)
        if len(self._tokens) >= _TOKEN_CACHE_LIMIT:
            self._tokens.clear()
        self._tokens[token] = (tenant, valid_until)
        return tenant

    def authorize(self, tenant: Tenant, model: str) -> None:
        key = (tenant.name, model)
        allowed = self._allowed.get(key)
        if allowed is None:
            allowed = self._allowed[key] = tenant.allows(model)
        if not allowed:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"tenant {tenant.name!r} may not call model {model!r}")

    def _verify(self, token: str) -> tuple[Tenant, float]:
        config = self._config
        assert config is not None
        if token.count(".") == 2 and token.startswith("eyJ"):
            return self._verify_jwt(config, token)
        digest = hash_key(token)
        # Every stored digest is compared in constant time (no early exit), so
        # timing reveals neither which key matched nor how much of one did.
        # Successful tokens are cached, so this loop runs once per key.
        tenant_name = None
        for stored, name in config.key_hashes.items():
            if hmac.compare_digest(stored, digest):
                tenant_name = name
        if tenant_name is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        tenant = config.tenants.get(tenant_name)
        if tenant is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "API key belongs to no configured tenant")
        return tenant, float("inf")

    def _verify_jwt(self, config: AuthConfig, token: str) -> tuple[Tenant, float]:
        if config.jwt is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "JWTs are not accepted by this gateway")
        try:
            algorithm = jwt.get_unverified_header(token).get("alg", "")
            claims: dict[str, Any] = jwt.decode(
                token,
                config.jwt.key_for(algorithm),
                algorithms=[algorithm],
                audience=config.jwt.audience,
                options={"verify_aud": config.jwt.audience is not None},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "JWT has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "JWT is not valid yet (nbf)") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, f"JWT audience is wrong: expected {config.jwt.audience!r}"
            ) from exc
        except jwt.PyJWTError as exc:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"invalid JWT: {exc}") from exc
        tenant_name = claims.get(config.jwt.tenant_claim)
        tenant = config.tenants.get(str(tenant_name)) if tenant_name is not None else None
        if tenant is None:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"JWT claim {config.jwt.tenant_claim!r} names no configured tenant ({tenant_name!r})",
            )
        expires = claims.get("exp")
        return tenant, float(expires) if isinstance(expires, int | float) else float("inf")


async def authenticate_call(auth: Authenticator, context: grpc.aio.ServicerContext, model: str | None = None) -> Tenant:
    """The caller's tenant (allowed `model`, when one is named); otherwise the call ends with the auth error's code."""
    try:
        tenant = auth.authenticate(context.invocation_metadata())
        if model is not None:
            auth.authorize(tenant, model)
    except AuthError as exc:
        await context.abort(exc.code, exc.message)
    return tenant


class AuthFileWatcher:
    """Reloads the auth file when it changes, so keys rotate without a restart.

    A stat() every `interval` seconds costs next to nothing; an unreadable or
    invalid new file is logged and the previous configuration stays in force.
    """

    def __init__(
        self, path: Path, authenticator: Authenticator, *, interval: float = 0.5, extra: AuthConfig | None = None
    ) -> None:
        self.path = path
        self.authenticator = authenticator
        self.interval = interval
        self.extra = extra
        self._signature: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def load(self) -> AuthConfig:
        """Loads the file now (raises on error); used at start, where a bad file must stop the gateway."""
        self._signature = self._stat()
        config = merge(parse_auth_file(self.path), self.extra)
        self.authenticator.replace(config)
        return config

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="auth-file-watcher")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            signature = self._stat()
            if signature == self._signature or signature is None:
                continue
            try:
                self.load()
                log.info("auth file reloaded", extra={"path": str(self.path)})
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                self._signature = signature
                log.error("auth file %s is invalid, keeping the previous one: %s", self.path, exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
