"""The bundled offline language model: a supervised local server behind a fair-queueing loopback proxy.

``async with LocalModel.from_settings(settings) as model:`` gives ``model.url``, an OpenAI-compatible base
URL that the control plane hands to agents as ``CARAVAN_LOCAL_MODEL_URL``. Agents on the ``local``
provider talk to it with the same OpenAI client as every hosted provider.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from agent.protocol import LOCAL_MODEL_DEFAULT
from control.localmodel.fairqueue import FairQueue, QueueFull, QueueTimeout
from control.localmodel.proxy import ModelProxy, Upstream, repair_request
from control.localmodel.runtime import LlamaServer, LocalModelUnavailable, bundled_model_path, runtime_installed
from control.settings import Settings

__all__ = [
    "FairQueue",
    "LlamaServer",
    "LocalModel",
    "LocalModelConfig",
    "LocalModelUnavailable",
    "ModelProxy",
    "QueueFull",
    "QueueTimeout",
    "Upstream",
    "bundled_model_path",
    "repair_request",
    "runtime_installed",
]

log = logging.getLogger("caravan.localmodel")


@dataclass(frozen=True)
class LocalModelConfig:
    log_path: Path
    model_path: Path | None = None  # None: the bundled SmolLM2
    threads: int | None = None  # None: every core but one
    context_tokens: int = 4096
    queue_timeout_s: float = 120.0
    max_waiting: int = 64
    default_max_tokens: int = 512

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalModelConfig:
        return cls(
            log_path=settings.data_dir / "localmodel" / "server.log",
            model_path=settings.local_model_path,
            threads=settings.local_model_threads,
            queue_timeout_s=settings.local_model_queue_timeout_s,
        )


class LocalModel:
    """The local model server and its proxy as one component: ``start()`` brings up both, ``stop()`` both."""

    def __init__(self, config: LocalModelConfig) -> None:
        self.config = config
        self.server: LlamaServer | None = None
        self.proxy: ModelProxy | None = None
        self._started = False

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalModel:
        return cls(LocalModelConfig.from_settings(settings))

    async def __aenter__(self) -> LocalModel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        if self.proxy is None:
            raise RuntimeError("the local model is not started")
        return self.proxy.url

    @property
    def model_name(self) -> str:
        return self.config.model_path.stem if self.config.model_path else LOCAL_MODEL_DEFAULT

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("local model already started")
        self._started = True
        cfg = self.config
        self.server = LlamaServer(
            cfg.model_path or bundled_model_path(),
            cfg.log_path,
            model_alias=self.model_name,
            threads=cfg.threads,
            context_tokens=cfg.context_tokens,
        )
        queue = FairQueue(slots=1, max_waiting=cfg.max_waiting, wait_timeout=cfg.queue_timeout_s)
        self.proxy = ModelProxy(self.server, queue, default_max_tokens=cfg.default_max_tokens)
        try:
            await self.server.start()
            await self.proxy.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.stop()
        if self.server is not None:
            await self.server.stop()
