"""The servers Caravan starts on one machine: the embedded nats-server's Go threads (one by default,
control.natsserver.GO_THREADS; the operator's ``GOMAXPROCS`` when the environment sets it), it being started again
when it dies, and neither it nor the local model server outliving the process that started them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import nats
import nats.errors
import psutil
import pytest
from nats.js.api import StreamInfo

from control.localmodel.runtime import runtime_installed
from control.natsauth import NatsAuth
from control.natsserver import GO_THREADS, EmbeddedNats
from tests.support.helpers import assert_eventually, now


def go_threads_of(server: EmbeddedNats) -> str:
    environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
    return next(v.decode() for k, _, v in (e.partition(b"=") for e in environ) if k == b"GOMAXPROCS")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the server's environment from /proc")
async def test_the_embedded_server_runs_on_one_go_thread_unless_the_environment_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    async with EmbeddedNats(tmp_path / "default") as server:
        assert go_threads_of(server) == str(GO_THREADS) == "1"
    monkeypatch.setenv("GOMAXPROCS", "3")
    async with EmbeddedNats(tmp_path / "operator") as server:
        assert go_threads_of(server) == "3"


async def test_a_server_that_dies_is_started_again_on_its_port_with_its_store_and_its_users(tmp_path: Path) -> None:
    """A nats-server killed under `caravan up` (the OOM killer, an operator) comes back where its clients reconnect:
    the control plane and the agents would otherwise try to reconnect for good, every request answered 503. An agent
    added while it is away gets its user all the same."""
    auth = NatsAuth(tmp_path / "nats")
    async with EmbeddedNats(tmp_path / "nats", auth=True) as server:
        auth.server = server
        login = auth.control()
        nc = await nats.connect(server.url, user=login.user, password=login.password, reconnect_time_wait=0.1)
        try:
            js = nc.jetstream()
            await js.add_stream(name="KEPT", subjects=["kept.>"])
            await js.publish("kept.one", b"1")
            first = server.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            auth.add_agent("cu-0123456789ab", "ag-0123456789ab")  # the server gone: no error, the file written

            async def kept() -> StreamInfo | None:
                with contextlib.suppress(nats.errors.Error):
                    return await js.stream_info("KEPT")
                return None

            info = await assert_eventually(kept, lambda info: info is not None, what="the stream, on the same URL")
            assert info is not None and info.state.messages == 1
            assert server.pid not in (None, first)
            agent = auth.agent("ag-0123456789ab")
            added = await nats.connect(server.url, user=agent.user, password=agent.password, max_reconnect_attempts=0)
            await added.close()
        finally:
            await nc.close()


STARTERS = {
    "nats-server": "from control.natsserver import EmbeddedNats\nserver = EmbeddedNats(Path(sys.argv[1]))",
    "local model server": (
        "from control.localmodel.runtime import LlamaServer, bundled_model_path\n"
        "server = LlamaServer(bundled_model_path(), Path(sys.argv[1]) / 'server.log')"
    ),
}
PARENT = """
import asyncio, sys
from pathlib import Path
{starter}

async def main() -> None:
    await server.start()
    print(server.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.mark.parametrize("child", list(STARTERS))
async def test_a_server_we_start_stops_when_the_process_that_started_it_is_killed(tmp_path: Path, child: str) -> None:
    """A `caravan up` killed outright (SIGKILL, the OOM killer) leaves no nats-server behind holding the port and
    the JetStream store the next one opens, and no model server holding its memory."""
    if child == "local model server" and not runtime_installed():
        pytest.skip("the local model is not installed")
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT.format(starter=STARTERS[child]), str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    assert parent.stdout is not None
    pid = int(await asyncio.wait_for(parent.stdout.readline(), 120))
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    parent.kill()
    await parent.wait()

    def running() -> bool:
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        return False

    await assert_eventually(now(running), lambda alive: not alive, what=f"the {child} gone")
