"""Scheduler backends, chosen by name through an explicit table (never by dotted paths from config)."""

from __future__ import annotations

from collections.abc import Callable

from control.backends.base import Scheduler
from control.settings import Settings

__all__ = ["SCHEDULERS", "create_scheduler"]


def _local(settings: Settings) -> Scheduler:
    from control.backends.local import LocalScheduler

    return LocalScheduler(settings.data_dir / "allocs", install_id=settings.install_id)


def _nomad(settings: Settings) -> Scheduler:
    from control.backends.nomad import NomadConfig, NomadScheduler

    return NomadScheduler(NomadConfig.from_settings(settings))


SCHEDULERS: dict[str, Callable[[Settings], Scheduler]] = {"local": _local, "nomad": _nomad}


def create_scheduler(settings: Settings) -> Scheduler:
    try:
        factory = SCHEDULERS[settings.scheduler]
    except KeyError:
        raise ValueError(
            f"unknown scheduler {settings.scheduler!r}; available: {', '.join(sorted(SCHEDULERS))}"
        ) from None
    return factory(settings)
