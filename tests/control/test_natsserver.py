"""The embedded nats-server's Go threads: one by default (control.natsserver.GO_THREADS), the operator's
``GOMAXPROCS`` when the environment sets it."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.natsserver import GO_THREADS, EmbeddedNats


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
