"""CONSUL_HTTP_SSL / CONSUL_CACERT / CONSUL_HTTP_TOKEN reach the wire: https with the given CA, and the
ACL token on every call (an aiohttp HTTPS endpoint stands in for a TLS-enabled agent)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from registry.url import connect, parse_registry_url


@pytest.fixture
async def tls_agent(tmp_path: Path) -> AsyncIterator[tuple[int, Path, list[str | None]]]:
    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    tokens: list[str | None] = []

    async def leader(request: web.Request) -> web.Response:
        tokens.append(request.headers.get("X-Consul-Token"))
        return web.json_response("127.0.0.1:8300")

    app = web.Application()
    app.router.add_get("/v1/status/leader", leader)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port, ca_path, tokens
    finally:
        await runner.cleanup()


async def test_https_with_the_ca_and_the_token(
    tls_agent: tuple[int, Path, list[str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, ca_path, tokens = tls_agent
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    env = {"CONSUL_HTTP_SSL": "true", "CONSUL_CACERT": str(ca_path), "CONSUL_HTTP_TOKEN": "acl-token"}
    client = connect(parse_registry_url(f"consul://127.0.0.1:{port}", env))
    try:
        assert await client.status.leader() == "127.0.0.1:8300"
        assert await client.status.leader() == "127.0.0.1:8300"
    finally:
        await client.close()
    assert tokens == ["acl-token", "acl-token"]


async def test_https_without_the_ca_is_refused(tls_agent: tuple[int, Path, list[str | None]]) -> None:
    port, _, tokens = tls_agent
    client = connect(parse_registry_url(f"consul://127.0.0.1:{port}", {"CONSUL_HTTP_SSL": "true"}))
    try:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await client.status.leader()
    finally:
        await client.close()
    assert tokens == []
