"""The selector models' clients of the control plane's team runs.

A selector team's manager runs here and calls its model. A hosted or local model's client keeps no conversation
state, while making one costs ~20 ms of CPU on the event loop every run shares (its HTTP client's TLS context) and,
to a hosted provider, a new connection with its TLS handshake: so the runs of one team share one client per
selector model, as an agent's conversations share theirs (:class:`~agent.models.ModelClients`, which also gives the
scripted model a fresh client per run). A team's client outlives its runs while few teams' do; beyond ``keep``,
the least recently used one nobody is using is closed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from autogen_core.models import ChatCompletionClient

from agent.models import LocalModelAccess, ModelClients
from control.teams.models import Team


@dataclass
class _Entry:
    clients: ModelClients
    runs: int = 0


class SelectorClients:
    def __init__(self, local_model_url: str | None, keep: int = 16) -> None:
        """``local_model_url``: where selectors on ``local`` call the platform's model (None: it runs none)."""
        self._local_model_url = local_model_url
        self._keep = keep
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # oldest use first

    def get(self, team: Team) -> ChatCompletionClient | None:
        """The client for a run of ``team`` (None: not a selector team); give it back with :meth:`release`.
        Raises :class:`~agent.models.MissingCredentials` as making the client does."""
        if team.selector is None:
            return None
        key = _key(team)
        entry = self._entries.pop(key, None)
        if entry is None:
            local = LocalModelAccess(self._local_model_url, caller=f"selector-{team.id}")
            entry = _Entry(ModelClients(team.selector.model, local))
        client = entry.clients.get()  # before it is counted: it raises for a missing key
        entry.runs += 1
        self._entries[key] = entry
        return client

    async def release(self, team: Team, client: ChatCompletionClient) -> None:
        """The run ended: a scripted client is closed; a shared one stays, unless too many teams' are idle."""
        entry = self._entries[_key(team)]
        entry.runs -= 1
        idle = [key for key, e in self._entries.items() if e.runs == 0]
        # taken out before any wait: a run starting meanwhile must not get a client being closed
        closing = [self._entries.pop(key) for key in idle[: max(0, len(self._entries) - self._keep)]]
        await entry.clients.release(client)
        for gone in closing:
            await gone.clients.close()

    async def close(self) -> None:
        """After the runs."""
        while self._entries:
            await self._entries.popitem(last=False)[1].clients.close()


def _key(team: Team) -> tuple[str, str]:
    """A selector team's clients are its own, and a changed model gets a client of its own."""
    assert team.selector is not None
    return team.id, team.selector.model.model_dump_json()
