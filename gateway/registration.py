"""Self-registration of a gateway in the registry, as `meshserve-gateway`.

Load balancers in front that follow Consul (its DNS, consul-template, Envoy's
or Traefik's Consul discovery) and Prometheus (`consul_sd_configs`) find the
gateways there. The registry health-checks the public port's
`grpc.health.v1`: a gateway passes while it can route (at least one passing
worker) and leaves `?passing` the moment its drain begins.
"""

from __future__ import annotations

from meshserve import __version__

# A gateway with no passing worker fails its check, for as long as the workers are gone: it must
# stay in the catalog meanwhile (critical, so out of `?passing`), not be reaped and registered again
# every 30 s. A killed gateway stays listed as critical this long.
DEREGISTER_CRITICAL_AFTER = "10m"


class GatewayRegistration:
    """Registers the gateway while it serves; `drain` takes it out of the registry first thing on SIGTERM."""

    def __init__(
        self, registry_url: str, address: str, port: int, metrics_port: int | None, processes: int, tls: bool
    ) -> None:
        from registry.model import GATEWAY_SERVICE_NAME
        from registry.registration import SelfRegistration, ServiceRegistration, new_service_id
        from registry.settings import RegistrySettings

        meta = {"grpc_port": str(port), "processes": str(processes), "version": __version__}
        if metrics_port:
            meta["metrics_port"] = str(metrics_port)
        registration = ServiceRegistration(
            service_id=new_service_id(port),
            address=address,
            port=port,
            meta=meta,
            name=GATEWAY_SERVICE_NAME,
            # The registry's gRPC probe cannot verify the public port's certificate: with TLS the
            # gateway heartbeats a TTL check instead (its readiness is then not reflected).
            check="ttl" if tls else "grpc",
            deregister_after=DEREGISTER_CRITICAL_AFTER,
        )
        self._registration = SelfRegistration(registry_url, registration, settings=RegistrySettings())
        self.service_id = registration.service_id
        self._drained = False

    async def start(self) -> None:
        await self._registration.start()

    async def drain(self) -> None:
        """Maintenance, then deregister; once (later calls do nothing), and never raises."""
        if not self._drained:
            self._drained = True
            await self._registration.drain()

    async def close(self) -> None:
        await self._registration.close()
