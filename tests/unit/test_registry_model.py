"""The registry's Python model, URL conventions and static sources."""

from __future__ import annotations

import asyncio

import pytest

from registry.interface import ConfigSource, EndpointSource, Registrar
from registry.model import EndpointChange, ModelVersion, ServiceInstance, diff_instances, model_tag
from registry.registration import SelfRegistration, ServiceRegistration, new_service_id
from registry.static import StaticDiscovery, StaticKV
from registry.url import RegistryURLError, parse_registry_url


def instance(sid: str = "w1", tags: tuple[str, ...] = ("meshserve", "model=mlp:1"), **meta: str) -> ServiceInstance:
    return ServiceInstance(sid, "10.0.0.1", 9000, tags, meta)


def test_models_come_from_model_tags() -> None:
    inst = instance(tags=("meshserve", model_tag("mlp", 1), "model=cnn:12", "model=bad", "model=:1", "other"))
    assert inst.models == frozenset({ModelVersion("mlp", "1"), ModelVersion("cnn", "12")})
    assert inst.serves("mlp") and inst.serves("cnn", "12") and not inst.serves("cnn", "1")
    assert inst.target == "10.0.0.1:9000"
    assert ServiceInstance("x", "::1", 5).target == "[::1]:5"


def test_instances_are_frozen_and_hashable_with_their_meta() -> None:
    a, b = instance(device="cpu"), instance(device="cpu")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != instance(device="cuda:0")
    with pytest.raises(TypeError):
        a.meta["device"] = "gpu"  # type: ignore[index]


def test_from_health_entry_falls_back_to_the_node_address() -> None:
    entry = {
        "Node": {"Address": "192.168.1.5"},
        "Service": {"ID": "w", "Address": "", "Port": 7, "Tags": ["model=a:2"], "Meta": {"device": "cpu"}},
    }
    inst = ServiceInstance.from_health_entry(entry)
    assert inst.target == "192.168.1.5:7" and inst.meta["device"] == "cpu"


def test_diff_reports_removed_added_updated() -> None:
    old = {"a": instance("a"), "b": instance("b")}
    new = {"b": instance("b", tags=("model=mlp:2",)), "c": instance("c")}
    assert diff_instances(old, new) == [
        EndpointChange("removed", old["a"]),
        EndpointChange("updated", new["b"]),
        EndpointChange("added", new["c"]),
    ]
    assert diff_instances(new, dict(new)) == []


def test_url_conventions() -> None:
    env = {"CONSUL_HTTP_TOKEN": "secret", "CONSUL_CACERT": "/ca.pem"}
    address = parse_registry_url("consul://consul.internal:8501", env)
    assert (address.host, address.port, address.scheme, address.token, address.ca_file) == (
        "consul.internal",
        8501,
        "http",
        "secret",
        "/ca.pem",
    )
    assert "secret" not in str(address)
    assert parse_registry_url(None, {"CONSUL_HTTP_ADDR": "10.1.1.1:8500"}).host == "10.1.1.1"
    assert parse_registry_url("consul://h:1", {"CONSUL_HTTP_SSL": "true"}).scheme == "https"
    assert parse_registry_url("consul://h", {}).port == 8500
    for bad in ("redis://h:1", "consul://:8500", "consul://h:notaport"):
        with pytest.raises(RegistryURLError):
            parse_registry_url(bad, {})
    with pytest.raises(RegistryURLError, match="CONSUL_HTTP_ADDR"):
        parse_registry_url(None, {})


def test_registration_check_definitions() -> None:
    sid = new_service_id(9000)
    assert sid.split("-")[-2] == "9000"
    grpc_reg = ServiceRegistration(sid, "10.0.0.2", 9000, tags=["model=a:1"])
    assert grpc_reg.all_tags() == ["meshserve", "model=a:1"]
    check = grpc_reg.check_definition()
    assert check["GRPC"] == "10.0.0.2:9000" and check["CheckID"] == f"service:{sid}"
    assert check["Interval"] == "1s" and check["Timeout"] == "1s" and check["DeregisterCriticalServiceAfter"] == "30s"
    ttl_reg = ServiceRegistration(sid, "10.0.0.2", 9000, check="ttl", ttl="3s")
    assert ttl_reg.check_definition()["TTL"] == "3s" and "GRPC" not in ttl_reg.check_definition()
    assert ttl_reg.heartbeat_interval_s(5.0) == 1.0


async def test_static_discovery_has_the_watcher_interface() -> None:
    a, b = instance("a"), instance("b")
    source = StaticDiscovery([a])
    assert isinstance(source, EndpointSource)
    assert await anext(source) == [EndpointChange("added", a)]
    source.set([b])
    assert await anext(source) == [EndpointChange("removed", a), EndpointChange("added", b)]
    assert source.snapshot() == {"b": b}
    pending = asyncio.create_task(anext(source))
    await source.close()
    with pytest.raises(StopAsyncIteration):
        await pending


async def test_static_kv_has_the_kv_watcher_interface() -> None:
    kv = StaticKV({"meshserve/routes/a": b"{}"})
    assert isinstance(kv, ConfigSource)
    assert await anext(kv) == {"meshserve/routes/a": b"{}"}
    kv.set({})
    assert await anext(kv) == {}
    await kv.close()


def test_self_registration_satisfies_the_registrar_protocol() -> None:
    reg = SelfRegistration("consul://127.0.0.1:1", ServiceRegistration("x", "127.0.0.1", 1))
    assert isinstance(reg, Registrar)


async def test_the_acl_token_is_sent_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from registry.url import connect

    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "acl-secret")
    client = connect("consul://127.0.0.1:8500")
    try:
        assert client.prepare_headers() == {"X-Consul-Token": "acl-secret"}
    finally:
        await client.close()
