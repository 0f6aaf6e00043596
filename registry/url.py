"""Where the registry is and how to talk to it: `consul://HOST:PORT` plus Consul's own CLI variables.

`CONSUL_HTTP_ADDR` (used when no URL is given), `CONSUL_HTTP_TOKEN` (ACL token, sent on every call),
`CONSUL_HTTP_SSL` (https), `CONSUL_CACERT` (CA bundle to verify the agent's certificate), as the
`consul` CLI reads them. This module is the one place that reads those variables.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import consul.aio
import consul.base

DEFAULT_PORT = 8500
_SCHEMES = {"consul": "http", "consul+http": "http", "consul+https": "https", "http": "http", "https": "https"}


class RegistryURLError(ValueError):
    """A registry URL the client cannot use."""


@dataclass(frozen=True)
class ConsulAddress:
    host: str
    port: int
    scheme: str = "http"
    token: str | None = None
    ca_file: str | None = None

    @property
    def http_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:  # never prints the token
        return self.http_url


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def parse_registry_url(url: str | None, environ: Mapping[str, str] | None = None) -> ConsulAddress:
    """`consul://HOST:PORT` (or `CONSUL_HTTP_ADDR` when `url` is empty) with the CONSUL_* conventions applied."""
    env = os.environ if environ is None else environ
    raw = (url or env.get("CONSUL_HTTP_ADDR") or "").strip()
    if not raw:
        raise RegistryURLError("no registry given: pass --registry consul://HOST:PORT or set CONSUL_HTTP_ADDR")
    if "://" not in raw:
        raw = f"consul://{raw}"  # CONSUL_HTTP_ADDR is usually a bare host:port
    parsed = urllib.parse.urlsplit(raw)
    scheme = _SCHEMES.get(parsed.scheme.lower())
    if scheme is None:
        raise RegistryURLError(f"registry URL {url!r} must look like consul://HOST:PORT")
    try:
        port = parsed.port or DEFAULT_PORT
    except ValueError as exc:
        raise RegistryURLError(f"registry URL {raw!r} has an invalid port") from exc
    host = parsed.hostname
    if not host:
        raise RegistryURLError(f"registry URL {raw!r} has no host (expected consul://HOST:PORT)")
    if _truthy(env.get("CONSUL_HTTP_SSL")):
        scheme = "https"
    return ConsulAddress(
        host=host,
        port=port,
        scheme=scheme,
        token=env.get("CONSUL_HTTP_TOKEN") or None,
        ca_file=env.get("CONSUL_CACERT") or None,
    )


class _HTTPClient(consul.aio.HTTPClient):
    """py-consul's aiohttp adapter with an explicit TLS context and no total timeout (callers bound each
    call; a blocking query may rightly take minutes). py-consul's own passes aiohttp arguments that
    are deprecated."""

    def __init__(self, host: str, port: int, scheme: str, verify: bool | str = True, cert: object = None) -> None:
        consul.base.HTTPClient.__init__(self, host, port, scheme, verify=verify, cert=cert)
        self.loop = None
        tls: ssl.SSLContext | bool = False
        if scheme == "https":
            tls = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            if verify is False:
                tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls), timeout=timeout)
        self.token: str | None = None

    def _request(self, callback, method, uri, headers, data=None, connections_timeout=None, raw=False):  # type: ignore[no-untyped-def,override]
        # Some py-consul calls (e.g. /status/leader) send no token; an ACL-enabled cluster needs it on all.
        if self.token and not (headers or {}).get("X-Consul-Token"):
            headers = {**(headers or {}), "X-Consul-Token": self.token}
        return super()._request(callback, method, uri, headers, data, connections_timeout, raw)


class _Consul(consul.aio.Consul):
    def http_connect(self, host: str, port: int, scheme: str, verify: bool | str = True, cert: object = None):  # type: ignore[no-untyped-def]
        return _HTTPClient(host, port, scheme, verify=verify, cert=cert)


def connect(address: ConsulAddress | str | None) -> consul.aio.Consul:
    """An async py-consul client for `address`. Call inside a running event loop; close it with `await c.close()`."""
    if not isinstance(address, ConsulAddress):
        address = parse_registry_url(address)
    client = _Consul(
        host=address.host, port=address.port, scheme=address.scheme, token=address.token, verify=address.ca_file or True
    )
    client.http.token = client.token
    return client
