"""End to end with real worker processes registering themselves in the embedded agent: model tags,
a kill -9 leaving the passing set within check interval + timeout, and a SIGTERM leaving it before
the worker's port closes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import pytest

from registry.discovery import ServiceWatcher
from registry.model import ModelVersion, ServiceInstance
from registry.registration import ServiceRegistration
from registry.settings import RegistrySettings
from tests.harness import ProcessGroup, port_open

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:verify_ssl is deprecated:DeprecationWarning"),
]

SETTINGS = RegistrySettings(registry_watch_wait_s=10, registry_backoff_initial_s=0.05, registry_backoff_max_s=0.5)


async def next_batch_where(watcher: ServiceWatcher, predicate, within: float) -> float:  # type: ignore[no-untyped-def]
    """Seconds until the watcher's endpoint set satisfies `predicate`."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        while not predicate(watcher.snapshot()):
            await anext(watcher)
    return time.monotonic() - started


def repository_models(root: Path) -> frozenset[ModelVersion]:
    """Every `<model>/<version>/` in a Triton-layout repository."""
    return frozenset(
        ModelVersion(model.name, version.name)
        for model in root.iterdir()
        if model.is_dir()
        for version in model.iterdir()
        if version.name.isdigit()
    )


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


async def test_three_workers_register_then_leave_on_kill_and_on_sigterm(
    processes: ProcessGroup, demo_repository: Path
) -> None:
    _, url = processes.registry()
    workers = [processes.worker(demo_repository, registry_url=url) for _ in range(3)]
    expected_models = repository_models(demo_repository)
    watcher = ServiceWatcher(url, settings=SETTINGS)
    try:
        await next_batch_where(watcher, lambda s: len(s) == 3, 15)
        by_port: dict[int, ServiceInstance] = {inst.port: inst for inst in watcher.snapshot().values()}
        assert set(by_port) == {port_of(address) for _, address in workers}
        for inst in by_port.values():
            assert inst.models == expected_models
            assert "meshserve" in inst.tags
            assert inst.meta["grpc_port"] == str(inst.port) and inst.meta["device"] == "cpu"

        # kill -9: the agent's own gRPC check sees it within one interval + one timeout.
        killed, killed_address = workers[0]
        killed.kill9()
        defaults = ServiceRegistration("x", "h", 1)
        bound = 1.0 + 1.0  # check_interval + check_timeout of the defaults below
        assert (defaults.check_interval, defaults.check_timeout) == ("1s", "1s")
        left_after = await next_batch_where(watcher, lambda s: port_of(killed_address) not in by_ports(s), 10)
        assert left_after < bound + 0.5, f"a killed worker stayed in the passing set for {left_after:.2f}s"

        # SIGTERM: deregistered (maintenance first) while the worker still accepts connections.
        stopping, stopping_address = workers[1]
        stopping.signal(signal.SIGTERM)
        await next_batch_where(watcher, lambda s: port_of(stopping_address) not in by_ports(s), 10)
        assert port_open(port_of(stopping_address)), "the worker closed its port before leaving the passing set"
        assert len(watcher.snapshot()) == 1
        with contextlib.suppress(Exception):
            stopping.popen.wait(timeout=15)
        assert stopping.popen.returncode == 0
    finally:
        await watcher.close()


def by_ports(snapshot: dict[str, ServiceInstance]) -> set[int]:
    return {inst.port for inst in snapshot.values()}
