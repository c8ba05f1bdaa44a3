"""The control plane's selector model clients: one per team and model, kept for the team's next run, closed when
too many teams' are idle, and never while a run uses it."""

from __future__ import annotations

from typing import Any

import pytest
from autogen_core.models import ChatCompletionClient

from agent.models import ModelClients
from agent.protocol import ModelConfig
from control.teams.models import SelectorSpec, Team, Termination
from control.teams.selectors import SelectorClients

NOWHERE = "http://127.0.0.1:9/v1"  # never called: making a client connects nowhere


def _team(team_id: str, selector: ModelConfig | None = None, mode: str = "selector") -> Team:
    return Team(
        id=team_id,
        customer_id="cu-000000000001",
        name="team",
        members=["ag-000000000001", "ag-000000000002"],
        mode=mode,
        termination=Termination(max_messages=3),
        selector=SelectorSpec(model=selector or ModelConfig(provider="local")) if mode == "selector" else None,
    )


@pytest.fixture
def closed(monkeypatch: pytest.MonkeyPatch) -> list[ChatCompletionClient]:
    """The shared clients closed, in order."""
    out: list[ChatCompletionClient] = []
    close = ModelClients.close

    async def recorded(self: ModelClients) -> None:
        if self._shared is not None:
            out.append(self._shared)
        await close(self)

    monkeypatch.setattr(ModelClients, "close", recorded)
    return out


async def test_a_teams_runs_share_its_client_and_a_changed_model_gets_its_own(closed: list[Any]) -> None:
    selectors = SelectorClients(NOWHERE)
    a, b = _team("tm-00000000000a"), _team("tm-00000000000b")
    first = selectors.get(a)
    assert selectors.get(a) is first  # two runs at once
    await selectors.release(a, first)
    await selectors.release(a, first)
    assert selectors.get(a) is first and closed == []  # and the next one
    assert selectors.get(b) is not first  # another team's calls are queued under its own name
    changed = _team("tm-00000000000a", ModelConfig(provider="local", temperature=0))
    assert selectors.get(changed) is not first
    assert selectors.get(_team("tm-00000000000c", mode="round_robin")) is None
    await selectors.close()
    assert len(closed) == 3


async def test_beyond_keep_the_least_recently_used_idle_client_is_closed_never_one_in_use(closed: list[Any]) -> None:
    selectors = SelectorClients(NOWHERE, keep=1)
    a, b, c = (_team(f"tm-00000000000{x}") for x in "abc")
    in_use = selectors.get(a)
    idle_b = selectors.get(b)
    await selectors.release(b, idle_b)
    assert closed == [idle_b]  # two kept, one allowed: b is idle, a is not
    idle_c = selectors.get(c)
    await selectors.release(c, idle_c)
    assert closed == [idle_b, idle_c]
    await selectors.release(a, in_use)
    assert closed == [idle_b, idle_c]  # a alone is within keep
    assert selectors.get(a) is in_use


async def test_a_scripted_selector_gets_a_fresh_client_each_run() -> None:
    """It plays its answers from the first (a checkpoint seeks it to its place)."""
    selectors = SelectorClients(None)
    scripted = _team("tm-00000000000a", ModelConfig(provider="replay", name="s", responses=["alice"]))
    first, second = selectors.get(scripted), selectors.get(scripted)
    assert first is not second
    await selectors.release(scripted, first)
    await selectors.release(scripted, second)
    assert selectors.get(scripted) not in (first, second)
