from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS

from agent import aio
from agent.backends.consul import client_env
from control.localmodel import LocalModel, LocalModelConfig, runtime_installed
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.settings import Settings
from gateway.app import create_app
from tests.support.consul_double import ConsulDouble
from tests.support.helpers import serve_app
from tests.support.nomad_double import NomadDouble

ADMIN_KEY = "test-admin-key-0123456789abcdef"
CHECKOUT = str(Path(__file__).resolve().parents[1])


def pytest_configure(config: pytest.Config) -> None:
    """Agent processes (``python -m agent``, which the local scheduler starts in a directory of their own) import
    the code of the checkout under test, not the one an editable install points at: git worktrees share one
    virtualenv, and their tests would otherwise run the agents of another."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if CHECKOUT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([CHECKOUT, *paths])


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The suite runs on the event loop Caravan's processes run on (agent.aio.new_event_loop)."""
    return {"caravan": aio.new_event_loop}


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """The real nats-server with JetStream on disk, on a random port."""
    async with EmbeddedNats(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    """A connection to :func:`nats_server`."""
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


def make_settings(nats_url: str, data_dir: Path, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "nats_url": nats_url,
        "data_dir": data_dir,
        "admin_key": ADMIN_KEY,
        "jwt_secret": "test-secret-" + "x" * 32,
        "agent_python": sys.executable,
        "agent_restart_delay_s": 0.2,
        "agent_kill_timeout_s": 3,
        "task_ack_wait_s": 30,
        "rate_limit_scale": 100,  # tests poll quickly; the limits have their own test
    }
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def local_model(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalModel]:
    """The bundled local model (its server and the fair-queueing proxy), shared by the whole session."""
    if os.environ.get("CARAVAN_LOCAL_MODEL") == "0":
        pytest.skip("CARAVAN_LOCAL_MODEL=0: the local model is switched off on this machine")
    if not runtime_installed():
        pytest.fail("the local model is not installed: ./dev/test installs it (or set CARAVAN_LOCAL_MODEL=0)")
    config = LocalModelConfig(log_path=tmp_path_factory.mktemp("localmodel") / "server.log")
    async with LocalModel(config) as model:
        yield model


@pytest.fixture
def settings(nats_server: EmbeddedNats, tmp_path: Path) -> Settings:
    return make_settings(nats_server.url, tmp_path / "data")


@pytest.fixture
async def control(settings: Settings) -> AsyncIterator[ControlPlane]:
    async with ControlPlane(settings) as plane:
        yield plane


@dataclass
class Api:
    base: str
    client: httpx.AsyncClient
    control: ControlPlane

    async def token(self, api_key: str) -> dict[str, str]:
        response = await self.client.post("/v1/auth/token", json={"api_key": api_key})
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    async def admin(self) -> dict[str, str]:
        return await self.token(ADMIN_KEY)

    async def new_customer(self, name: str = "acme") -> tuple[str, dict[str, str]]:
        response = await self.client.post("/v1/admin/customers", json={"name": name}, headers=await self.admin())
        assert response.status_code == 201, response.text
        body = response.json()
        return body["id"], await self.token(body["api_key"])


@contextlib.asynccontextmanager
async def serve_api(control: ControlPlane) -> AsyncIterator[Api]:
    """The gateway for ``control`` on a real HTTP port, with a client for it."""
    app = create_app(control.settings, control)
    async with serve_app(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
        yield Api(base, client, control)


@pytest.fixture
async def api(control: ControlPlane) -> AsyncIterator[Api]:
    async with serve_api(control) as served:
        yield served


CONSUL_KINDS = ["consul-double", pytest.param("consul-real", marks=pytest.mark.consul)]
"""Parameters for tests that run against the Consul double, and against a real Consul when one is set."""


@contextlib.contextmanager
def consul_env(kind: str) -> Iterator[dict[str, str]]:
    """The environment a Consul client is configured by (``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN``...): the
    double's, with ACLs on (default deny) so that a client that sends no token is refused, or the real Consul's
    from this process's environment."""
    if kind == "consul-real":
        address = os.environ.get("CONSUL_HTTP_ADDR")
        if not address:
            pytest.skip("CONSUL_HTTP_ADDR is not set: no real Consul to test against")
        yield {**client_env(os.environ), "CONSUL_HTTP_ADDR": address}
        return
    token = str(uuid.uuid4())
    double = ConsulDouble(acl_token=token).start()
    try:
        yield {"CONSUL_HTTP_ADDR": double.address, "CONSUL_HTTP_TOKEN": token}
    finally:
        double.stop()


@pytest.fixture
def consul_double() -> Iterator[ConsulDouble]:
    """The Consul double alone, for what only a double can do (an outage on demand)."""
    double = ConsulDouble().start()
    try:
        yield double
    finally:
        double.stop()


@dataclass
class NomadTarget:
    """Where a Nomad contract test runs: the API double (``double`` is set) or the real server at NOMAD_ADDR."""

    address: str
    token: str | None = None
    double: NomadDouble | None = None

    @property
    def real(self) -> bool:
        return self.double is None


NOMAD_TARGETS = [pytest.param("double", id="double"), pytest.param("real", id="real-nomad", marks=pytest.mark.nomad)]
"""Parametrize a Nomad test with these: it runs against the double, and (``-m nomad``) against a real Nomad."""


@pytest.fixture(params=NOMAD_TARGETS)
def nomad_target(request: pytest.FixtureRequest) -> Iterator[NomadTarget]:
    if request.param == "real":
        yield NomadTarget(os.environ["NOMAD_ADDR"], os.environ.get("NOMAD_TOKEN") or None)
        return
    with NomadDouble() as double:
        yield NomadTarget(double.address, None, double)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The markers sit on the real-server variants only (NOMAD_TARGETS): without the address those variants are
    # skipped with the reason, and the same tests still run against the API double.
    for marker, env in (("nomad", "NOMAD_ADDR"), ("consul", "CONSUL_HTTP_ADDR")):
        if not os.environ.get(env):
            skip = pytest.mark.skip(reason=f"{env} is not set: no real {marker.title()} to test against")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)
