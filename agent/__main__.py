"""Entry point of the agent process: ``python -m agent`` (configured by the job's environment)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from agent.aio import run
from agent.logsafe import Redacting, install_on_handlers, keep_content_out, secrets_in_env
from agent.models import MissingCredentials
from agent.worker import AgentWorker, DefinitionUnavailable, WorkerConfig


async def _main() -> int:
    try:
        config = WorkerConfig.from_env()
    except ValueError as exc:
        print(f"caravan-agent: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = AgentWorker(config)
    try:
        await worker.start()
    except DefinitionUnavailable as exc:
        print(f"caravan-agent: {exc}", file=sys.stderr)
        await worker.stop()
        return 3
    except MissingCredentials as exc:  # its environment, as the platform made it: as a missing setting
        print(f"caravan-agent: cannot call its model: {exc}", file=sys.stderr)
        await worker.stop()
        return 2
    await stop.wait()
    await worker.stop()
    return 0


def configure_logging() -> None:
    """Its lines at INFO on stderr (the scheduler keeps them), without its secrets (its NATS password, its model's
    key) or its customer's content (AutoGen's events)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_on_handlers(Redacting(secrets_in_env(os.environ)))
    keep_content_out(logging.INFO)


def main() -> None:
    configure_logging()
    sys.exit(run(_main()))


if __name__ == "__main__":
    main()
