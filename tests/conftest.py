from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from control.localmodel import LocalModel, LocalModelConfig, runtime_installed
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.settings import Settings
from gateway.app import create_app
from tests.support.helpers import serve_app

ADMIN_KEY = "test-admin-key-0123456789abcdef"


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """The real nats-server with JetStream on disk, on a random port."""
    async with EmbeddedNats(tmp_path / "nats") as server:
        yield server


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, env in (("nomad", "NOMAD_ADDR"), ("consul", "CONSUL_HTTP_ADDR")):
        if not os.environ.get(env):
            skip = pytest.mark.skip(reason=f"{env} is not set: no real {marker.title()} to test against")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)
