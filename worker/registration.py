"""Self-registration of a worker in the registry (Consul or the embedded agent).

All knowledge of `registry.registration` stays in this module: what the worker
announces (tags per served model version, Meta) and the calls it makes.
"""

from __future__ import annotations

import logging

from meshserve import __version__
from worker.repository import ModelRepository

log = logging.getLogger(__name__)


def model_tags(repository: ModelRepository) -> list[str]:
    return ["meshserve", *(f"model={name}:{version}" for name, version in repository.served())]


def worker_meta(repository: ModelRepository, port: int, metrics_port: int) -> dict[str, str]:
    served = [served for name in repository.model_names() for served in repository.versions_of(name)]
    devices = {served.model.device for served in served}
    max_batch = max((served.model.max_batch_size for served in served), default=0)
    return {
        "grpc_port": str(port),
        "metrics_port": str(metrics_port),
        "device": "cuda:0" if "cuda:0" in devices else "cpu",
        "max_batch": str(max_batch),
        "version": __version__,
    }


class WorkerRegistration:
    """Registers the worker, keeps its tags in step with the repository, and drains it."""

    def __init__(
        self,
        registry_url: str,
        address: str,
        port: int,
        metrics_port: int,
        repository: ModelRepository,
        tls: bool = False,
    ) -> None:
        from registry.registration import SelfRegistration, ServiceRegistration, new_service_id
        from registry.settings import RegistrySettings

        self.repository = repository
        registration = ServiceRegistration(
            service_id=new_service_id(port),
            address=address,
            port=port,
            tags=model_tags(repository),
            meta=worker_meta(repository, port, metrics_port),
            # The registry's gRPC health probe cannot complete a TLS handshake with a worker whose
            # certificate it cannot verify (or that demands a client certificate): a TLS worker
            # heartbeats a TTL check instead, and a killed one drops out when the TTL runs out.
            check="ttl" if tls else "grpc",
        )
        self._registration = SelfRegistration(registry_url, registration, settings=RegistrySettings())
        self.service_id = registration.service_id

    async def start(self) -> None:
        await self._registration.start()

    async def update_tags(self) -> None:
        await self._registration.set_tags(model_tags(self.repository))

    async def drain(self) -> None:
        """Maintenance, then deregister: balancers stop picking this worker."""
        await self._registration.drain()
        log.info("deregistered %s", self.service_id)

    async def close(self) -> None:
        await self._registration.close()
