"""Backends, chosen by name through explicit tables (never by dotted paths from config)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from nats.aio.client import Client as NATS

from agent.backends import create_flag_store
from agent.backends.base import FlagStore
from control.backends.base import Registry, Scheduler
from control.jobspec import task_secrets
from control.settings import Settings

__all__ = ["REGISTRIES", "SCHEDULERS", "create_flags", "create_registry", "create_scheduler"]


def _local(settings: Settings, registry: Registry) -> Scheduler:
    from control.backends.local import LocalScheduler

    return LocalScheduler(
        settings.data_dir / "allocs",
        install_id=settings.install_id,
        registry=registry,
        task_secrets=task_secrets(settings, os.environ),
        keep_days=settings.task_retention_days,
    )


def _nomad(settings: Settings, registry: Registry) -> Scheduler:
    from control.backends.nomad import NomadConfig, NomadScheduler

    return NomadScheduler(NomadConfig.from_settings(settings))  # Nomad's service block registers instances


def _natskv_registry(settings: Settings, nc: NATS) -> Registry:
    from control.backends.natskv import NatsKVRegistry

    return NatsKVRegistry(nc)


def _consul_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    if settings.consul_http_addr:
        env["CONSUL_HTTP_ADDR"] = settings.consul_http_addr
    return env


def _consul_registry(settings: Settings, nc: NATS) -> Registry:
    from control.backends.consul import ConsulRegistry

    return ConsulRegistry(env=_consul_env(settings))


SCHEDULERS: dict[str, Callable[[Settings, Registry], Scheduler]] = {"local": _local, "nomad": _nomad}
REGISTRIES: dict[str, Callable[[Settings, NATS], Registry]] = {"natskv": _natskv_registry, "consul": _consul_registry}


def _unknown(kind: str, name: str, choices: Iterable[str]) -> ValueError:
    return ValueError(f"unknown {kind} {name!r}; available: {', '.join(sorted(choices))}")


def create_scheduler(settings: Settings, registry: Registry) -> Scheduler:
    if settings.scheduler not in SCHEDULERS:
        raise _unknown("scheduler", settings.scheduler, SCHEDULERS)
    return SCHEDULERS[settings.scheduler](settings, registry)


def create_registry(settings: Settings, nc: NATS) -> Registry:
    if settings.flags not in REGISTRIES:
        raise _unknown("registry", settings.flags, REGISTRIES)
    return REGISTRIES[settings.flags](settings, nc)


def create_flags(settings: Settings, nc: NATS) -> FlagStore:
    """The flag store the control plane writes; with JetStream KV it also creates the bucket."""
    if settings.flags == "natskv":
        return create_flag_store("natskv", nc=nc)  # the bucket is made with the others (control.natsio)
    return create_flag_store(settings.flags, env=_consul_env(settings))
