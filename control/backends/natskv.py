"""Service discovery on the embedded default: instances in a JetStream KV bucket (``caravan_services``)."""

from __future__ import annotations

import contextlib
from datetime import timedelta

from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from agent.backends.natskv import kv_entries
from agent.protocol import utcnow
from control.backends.base import ServiceInstance

__all__ = ["NatsKVRegistry"]

BUCKET = "caravan_services"


class NatsKVRegistry:
    name = "natskv"

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._kv: KeyValue | None = None

    async def start(self) -> None:
        if self._kv is not None:
            raise RuntimeError("registry already started")
        self._kv = await self._nc.jetstream().key_value(BUCKET)  # made with the others (control.natsio)

    async def stop(self) -> None:
        self._kv = None

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("registry is not started")
        return self._kv

    async def register(self, instance: ServiceInstance) -> None:
        await self.kv.put(f"{instance.name}.{instance.id}", instance.model_dump_json().encode())

    async def set_status(self, instance: ServiceInstance) -> None:
        await self.register(instance.model_copy(update={"checked_at": utcnow()}))

    async def deregister(self, name: str, instance_id: str) -> None:
        with contextlib.suppress(KeyNotFoundError):
            await self.kv.delete(f"{name}.{instance_id}")

    async def instances(self, passing_only: bool = True) -> list[ServiceInstance]:
        found = [ServiceInstance.model_validate_json(e.value) for e in await kv_entries(self.kv) if e.value]
        now = utcnow()
        for i, instance in enumerate(found):
            if now - instance.checked_at > timedelta(seconds=instance.ttl_s):
                found[i] = instance.model_copy(update={"status": "critical", "output": "no check result (stale)"})
        return [i for i in found if i.status == "passing"] if passing_only else found
