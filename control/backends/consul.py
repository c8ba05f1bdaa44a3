"""Service discovery in Consul: read the health of agent services (registered by Nomad's service block,
or by the local scheduler with a TTL check that it keeps passing from its own run of the job's check)."""

from __future__ import annotations

import logging
import re

import consul

from agent.backends.consul import ConsulBackend
from control.backends.base import ServiceInstance

__all__ = ["ConsulRegistry"]

log = logging.getLogger("caravan.registry.consul")

_PREFIX = "caravan-agent-"
_NOMAD_SERVICE_ID = re.compile(r"_nomad-task-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-")


def _alloc_id(service_id: str) -> str:
    """The allocation a registered instance is: Nomad registers an allocation's service in Consul as
    ``_nomad-task-<alloc id>-<task, or group-<group>>-<service>-<port label>`` (``MakeAllocServiceID``,
    ``client/serviceregistration/id.go`` in hashicorp/nomad); the local scheduler under the allocation's ID."""
    nomad = _NOMAD_SERVICE_ID.match(service_id)
    return nomad.group(1) if nomad else service_id


def _check_id(instance_id: str) -> str:
    return f"service:{instance_id}"


class ConsulRegistry(ConsulBackend):
    name = "consul"

    async def register(self, instance: ServiceInstance) -> None:
        await self._call(
            self._client.agent.service.register,
            instance.name,
            service_id=instance.id,
            address=instance.address,
            port=instance.port,
            tags=["caravan", "agent"],
            meta=instance.meta,
            check=consul.Check.ttl(f"{int(instance.ttl_s)}s"),
        )

    async def set_status(self, instance: ServiceInstance) -> None:
        ttl = self._client.agent.check.ttl_pass if instance.status == "passing" else self._client.agent.check.ttl_fail
        if await self._call(ttl, _check_id(instance.id), notes=instance.output[:500]):
            return
        # Consul's 404 (py-consul's False): its agent no longer knows the check, restarted without its state or the
        # service deregistered by hand; the instance is registered again, as it was at its start
        log.info("Consul has no check for instance %s of %s: registering it again", instance.id, instance.name)
        await self.register(instance)
        await self._call(ttl, _check_id(instance.id), notes=instance.output[:500])

    async def deregister(self, name: str, instance_id: str) -> None:
        await self._call(self._client.agent.service.deregister, instance_id)

    async def instances(self, passing_only: bool = True) -> list[ServiceInstance]:
        _, services = await self._call(self._client.catalog.services)
        names = [name for name in services or {} if name.startswith(_PREFIX)]
        found: list[ServiceInstance] = []
        for name in names:
            _, entries = await self._call(self._client.health.service, name, passing=passing_only or None)
            for entry in entries or []:
                service = entry["Service"]
                checks = entry.get("Checks") or []
                passing = all(c.get("Status") == "passing" for c in checks)
                found.append(
                    ServiceInstance(
                        id=_alloc_id(service["ID"]),
                        name=service["Service"],
                        address=service.get("Address") or entry.get("Node", {}).get("Address", ""),
                        port=int(service.get("Port") or 0),
                        status="passing" if passing else "critical",
                        output="; ".join(c.get("Output", "") for c in checks if c.get("Output")),
                        meta=service.get("Meta") or {},
                    )
                )
        return found
