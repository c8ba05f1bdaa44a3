"""Flag stores: where killswitch flags live (JetStream KV on one machine, Consul KV in production).

Both the control plane (which engages flags) and the agent (which watches them) use these modules, so
each backend is written once. Backends are chosen by name through :data:`FLAG_STORES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.backends.base import FlagStore

__all__ = ["FLAG_STORES", "create_flag_store"]


def _natskv(**options: Any) -> FlagStore:
    from agent.backends.natskv import NatsKVFlags

    return NatsKVFlags(**options)


def _consul(**options: Any) -> FlagStore:
    from agent.backends.consul import ConsulFlags

    return ConsulFlags(**options)


FLAG_STORES: dict[str, Callable[..., FlagStore]] = {"natskv": _natskv, "consul": _consul}


def create_flag_store(name: str, **options: Any) -> FlagStore:
    try:
        factory = FLAG_STORES[name]
    except KeyError:
        raise ValueError(f"unknown flag store {name!r}; available: {', '.join(sorted(FLAG_STORES))}") from None
    return factory(**options)
