"""Service discovery in Consul as both schedulers fill it: the Consul double, and a real Consul (``-m consul``)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from agent.backends.consul import consul_client
from control.backends.base import ServiceInstance
from control.backends.consul import ConsulRegistry
from tests.conftest import CONSUL_KINDS, consul_env
from tests.support.consul_double import nomad_service
from tests.support.helpers import assert_eventually


@pytest.mark.parametrize("kind", CONSUL_KINDS)
async def test_an_instance_is_named_by_its_allocation_whoever_registered_it(kind: str) -> None:
    """The killswitch waits for each passing instance's acknowledgement, which an agent gives under its allocation's
    ID: an instance a Nomad client registered (``_nomad-task-<alloc id>-...``) is that allocation too."""
    agent_id = f"ag-{uuid.uuid4().hex[:12]}"
    name = f"caravan-agent-{agent_id}"
    meta = {"caravan_owner": "caravan", "caravan_agent": agent_id}
    on_nomad, on_local = str(uuid.uuid4()), str(uuid.uuid4())
    registration = nomad_service(on_nomad, name, 23001, meta)
    with consul_env(kind) as env:
        consul = consul_client(env)
        registry = ConsulRegistry(env=env)
        await registry.start()
        try:
            await asyncio.to_thread(
                consul.agent.service.register,
                name,
                service_id=registration["ID"],
                address=registration["Address"],
                port=registration["Port"],
                tags=registration["Tags"],
                meta=registration["Meta"],
                check=registration["Check"],
            )
            local = ServiceInstance(id=on_local, name=name, address="127.0.0.1", port=23002, meta=meta)
            await registry.register(local)
            await registry.set_status(local.model_copy(update={"status": "passing"}))

            found = await assert_eventually(
                registry.instances, lambda found: len([i for i in found if i.name == name]) == 2
            )
            assert {(i.id, i.port) for i in found if i.name == name} == {(on_nomad, 23001), (on_local, 23002)}
        finally:
            await asyncio.to_thread(consul.agent.service.deregister, registration["ID"])
            await registry.deregister(name, on_local)
            await registry.stop()


@pytest.mark.parametrize("kind", CONSUL_KINDS)
async def test_an_instance_consul_forgot_is_registered_again_at_its_next_check_result(kind: str) -> None:
    """A Consul agent restarted without its state (``-dev``, a lost data dir), or an operator's ``consul services
    deregister``, forgets an instance the local scheduler registered: its next check result finds no check (Consul's
    404 ``Unknown check ID``) and registers it again, as the JetStream KV registry does at each result. Else it
    stayed out of discovery until its allocation restarted, and the killswitch did not wait for its
    acknowledgement."""
    agent_id = f"ag-{uuid.uuid4().hex[:12]}"
    name = f"caravan-agent-{agent_id}"
    instance = ServiceInstance(
        id=str(uuid.uuid4()), name=name, address="127.0.0.1", port=23003, meta={"caravan_agent": agent_id}
    )
    passing = instance.model_copy(update={"status": "passing", "output": "HTTP GET /healthz: 200 OK"})
    with consul_env(kind) as env:
        registry = ConsulRegistry(env=env)
        await registry.start()
        try:
            await registry.register(instance)
            await registry.set_status(passing)
            await assert_eventually(registry.instances, lambda found: [i.id for i in found if i.name == name] != [])
            await asyncio.to_thread(consul_client(env).agent.service.deregister, instance.id)
            await assert_eventually(registry.instances, lambda found: [i for i in found if i.name == name] == [])

            await registry.set_status(passing)
            found = await assert_eventually(
                registry.instances,
                lambda found: [i.id for i in found if i.name == name] == [instance.id],
                what="the instance back in discovery",
            )
            assert [i.status for i in found if i.name == name] == ["passing"]
        finally:
            await registry.deregister(name, instance.id)
            await registry.stop()
