from __future__ import annotations

import statistics
from collections.abc import Iterable

import nats

from agent.teamprotocol import MemberJoin, join_subject


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def summary(values: list[float]) -> str:
    return (
        f"n={len(values)} p50={statistics.median(values) * 1000:.0f} ms "
        f"p95={percentile(values, 95) * 1000:.0f} ms max={max(values) * 1000:.0f} ms"
    )


async def join_members(nc: nats.NATS, customer_id: str, run_id: str, agent_ids: Iterable[str]) -> None:
    """Enlist one replica of each agent for run ``run_id``, as the team runner does (states sent as deltas)."""
    for agent_id in agent_ids:
        join = MemberJoin(
            run_id=run_id,
            task_id="tk-000000000000",
            customer_id=customer_id,
            agent_id=agent_id,
            team_key=run_id,
            state_deltas=True,
        )
        await nc.request(join_subject(customer_id, agent_id), join.model_dump_json().encode(), timeout=10)
