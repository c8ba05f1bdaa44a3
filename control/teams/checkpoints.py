"""Checkpoints of a team run between every two turns, so that a run broken off goes on from its last message.

A checkpoint is AgentChat's own team state (what ``BaseGroupChat.save_state`` returns and ``load_state`` takes),
put together without asking every member for its state:

- the manager's state is taken in the manager's process, at the one point where it is whole: the last message
  is in its thread and the next speaker is not chosen yet (a resumed run chooses it again, as the unbroken run
  did: round robin's index, the swarm's last handoff, the selector's model at its saved place);
- the member that just spoke sends its ``ChatAgentContainer`` state (its model context, the scripted model's
  place) on ``x.state`` with its answer (:mod:`agent.teamhost`), mostly as a delta to the state it sent
  before (the context's new messages); states are kept as sent and read, deltas applied, only when a
  checkpoint is written. The other members' states changed
  only by the messages they buffered since they last spoke, which are the thread's, so they are rebuilt
  from their last sent state and the thread;
- what the termination conditions have counted (messages, tokens, seconds), which AgentChat does not save;
- the transcript of the task so far, as the events a new attempt publishes again before it goes on.

The manager's thread is kept as dumps added message by message, so a turn costs the new message's dump, not
the whole thread's. Writing to KV happens off the turn's path: a writer task puts the newest checkpoint, at most
one every ``MIN_INTERVAL_S``, and no more often than keeps writing them to ``WRITE_SHARE`` of the time (turns that
come faster are stored together, so a fast team does not spend its time encoding checkpoints that are superseded
at once, nor a long conversation its time storing its growing state; a slow store never holds the conversation
up either). A new attempt may therefore redo the turns of the last such interval, which is as exact as going on
from the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from autogen_agentchat.messages import BaseChatMessage
from autogen_agentchat.state import TeamState
from nats.aio.msg import Msg

from agent.protocol import utcnow
from agent.teamprotocol import STATE_AFTER_HEADER, STATE_BASE_HEADER, STATE_MEMBER_HEADER, apply_state_delta
from control.store import Repo
from control.teams.build import termination_counters
from control.teams.models import Checkpoint

__all__ = ["TurnCheckpoints"]

log = logging.getLogger("caravan.teams")

STATE_WAIT_S = 5.0
"""How long a turn's checkpoint waits for the speaker's state (sent with its answer)."""
MIN_INTERVAL_S = 0.05
"""Checkpoints are written at most this often; turns that come faster are stored together."""
WRITE_SHARE = 0.1
"""Nor more often than keeps the time spent storing them to this share of the run's: a checkpoint grows with the
conversation (one that took 100 ms to store is followed by the next one a second later at the soonest)."""
Record = Callable[[Sequence[Any]], list[dict[str, Any]]]
"""The transcript entries (task events without attempt and time) of some of the run's messages."""


class _Sent:
    """A member's state as it came: whole, or a delta to the one it sent before (``base``). Read, and deltas
    applied, only when a checkpoint needs it (once: the result is kept and the chain behind it let go)."""

    __slots__ = ("_data", "_read", "after", "base")

    def __init__(self, after: str, data: bytes, base: _Sent | None = None, read: dict[str, Any] | None = None):
        self.after = after
        self.base = base
        self._data = data
        self._read = read

    @classmethod
    def whole(cls, state: dict[str, Any]) -> _Sent:
        """A state already read (a checkpoint's): no delta can follow it, it has no answer's id."""
        return cls("", b"", read=state)

    def read(self) -> dict[str, Any]:
        chain: list[_Sent] = []
        node: _Sent | None = self
        while node is not None and node._read is None:  # a loop, not recursion: chains may be long
            chain.append(node)
            node = node.base
        for node in reversed(chain):
            loaded = json.loads(node._data)
            node._read = loaded if node.base is None else apply_state_delta(node.base.read(), loaded)
            node.base, node._data = None, b""
        assert self._read is not None
        return self._read


@dataclass
class _Member:
    state: _Sent | None  # its container state when it last spoke
    since: int  # the thread's length then: what came after is in its buffer


@dataclass(frozen=True)
class _Snapshot:
    thread_len: int
    transcript_len: int
    manager: dict[str, Any]
    members: dict[str, tuple[_Sent | None, int]]
    termination: list[dict[str, float]] | None
    selector_position: int | None


class TurnCheckpoints:
    """The checkpoints of one attempt of one run: ``on_state`` takes the members' states from ``x.state``,
    ``on_turn`` is the manager's hook (:func:`control.teams.build.build_team`); ``flush()`` before the run is
    taken up again elsewhere, ``close()`` before the task's checkpoint is replaced or deleted."""

    def __init__(
        self,
        repo: Repo[Checkpoint],
        key: str,
        base: Checkpoint,
        members: Sequence[str],
        record: Record,
        selector: Any = None,
    ) -> None:
        self._repo = repo
        self._key = key
        self._base = base
        self._record = record
        self._selector = selector
        self._written_at = float("-inf")
        self._interval = MIN_INTERVAL_S
        self._now = asyncio.Event()
        agent_states: dict[str, Any] = dict((base.state or {}).get("agent_states", {}))
        self._manager_name = next((name for name in agent_states if name not in members), "")
        self._thread: list[dict[str, Any]] = list(agent_states.get(self._manager_name, {}).get("message_thread", []))
        self._buffered = [False] * len(self._thread)  # before the base, buffers are in the members' saved states
        self._members = {name: _Member(_whole(agent_states.get(name)), len(self._thread)) for name in members}
        self._transcript: list[dict[str, Any]] = []
        self._stale: set[str] = set()
        self._pushed: dict[str, tuple[str, _Sent | None]] = {}  # the last state each member sent (None: unusable)
        self._waiting: dict[str, asyncio.Future[_Sent | None]] = {}
        self._pending: _Snapshot | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self.enabled = True

    def on_state(self, msg: Msg) -> None:
        """A member's state after its turn, sent with its answer (empty: it could not send it). A delta
        goes with the member's state before only when that is the one it names: one missed or not usable, and
        the member has no known state until it sends one whole (it does every so many turns)."""
        headers = msg.headers or {}
        name, after = headers.get(STATE_MEMBER_HEADER), headers.get(STATE_AFTER_HEADER)
        if name not in self._members or not after:
            return
        sent: _Sent | None = None
        if msg.data:
            base_after = headers.get(STATE_BASE_HEADER)
            if base_after is None:
                sent = _Sent(after, msg.data)
            else:
                base = self._pushed.get(name, ("", None))[1]
                sent = _Sent(after, msg.data, base) if base is not None and base.after == base_after else None
        self._pushed[name] = (after, sent)
        waiter = self._waiting.get(after)
        if waiter is not None and not waiter.done():
            waiter.set_result(sent)

    async def on_turn(self, manager: Any) -> None:
        """The manager is about to choose the next speaker: the run can be taken up again from here."""
        if not self.enabled or self._closed:
            return
        self._manager_name = manager._name
        new = list(manager._message_thread[len(self._thread) :])
        if not new:
            return  # the run was resumed from here: nothing happened since
        last = new[-1]
        speaker = last.source if isinstance(last, BaseChatMessage) and last.source in self._members else None
        self._thread.extend(message.dump() for message in new)
        if speaker is not None:  # one member's turn: the others buffered its answer, not its inner events
            self._buffered.extend(i == len(new) - 1 for i in range(len(new)))
        else:  # the task or the human's answer: every member buffered all of it
            self._buffered.extend(isinstance(message, BaseChatMessage) for message in new)
        self._transcript.extend(self._record(new))
        if speaker is not None:
            await self._took_turn(speaker, last.id)
        if self._stale:
            return  # a member's state is unknown until it speaks again: keep the last good checkpoint
        self._schedule(
            _Snapshot(
                thread_len=len(self._thread),
                transcript_len=len(self._transcript),
                manager=await _manager_state(manager),
                members={name: (m.state, m.since) for name, m in self._members.items()},
                termination=termination_counters(manager._termination_condition)
                if manager._termination_condition is not None
                else None,
                selector_position=getattr(self._selector, "position", None),
            )
        )

    async def flush(self) -> None:
        """Store the newest checkpoint now and wait until it is stored."""
        self._now.set()
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def close(self) -> None:
        """Store nothing more (the run ended); wait for a write in flight so that none lands after the caller's."""
        self._closed = True
        self._pending = None
        await self.flush()

    async def _took_turn(self, speaker: str, message_id: str) -> None:
        pushed = self._pushed.get(speaker)
        here = pushed is not None and pushed[0] == message_id
        state = pushed[1] if pushed is not None and here else None
        if not here:  # it comes with the answer and is read first: one that came apart (a reconnect) is waited for
            waiter = self._waiting[message_id] = asyncio.get_running_loop().create_future()
            try:
                state = await asyncio.wait_for(waiter, STATE_WAIT_S)
            except TimeoutError:
                log.warning("no state from %s after its turn: no checkpoint until it speaks again", speaker)
            finally:
                self._waiting.pop(message_id, None)
        if state is None:  # none came, the member could not send it (too big), or a delta to a state missed
            self._stale.add(speaker)
            return
        self._members[speaker] = _Member(state, len(self._thread))
        self._stale.discard(speaker)

    def _schedule(self, snapshot: _Snapshot) -> None:
        self._pending = snapshot
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name=f"checkpoint-{self._key}")

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending is not None and not self._closed:
            wait = self._written_at + self._interval - loop.time()
            if wait > 0 and not self._now.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._now.wait(), wait)
            snapshot, self._pending = self._pending, None
            if snapshot is None or self._closed:
                return
            started = loop.time()
            try:
                await self._repo.put(self._key, self._checkpoint(snapshot))
            except Exception:  # the run goes on; a later checkpoint (or the last one stored) will serve
                log.warning("team task %s: could not store a checkpoint", self._key, exc_info=True)
            self._written_at = loop.time()
            self._interval = max(MIN_INTERVAL_S, (self._written_at - started) / WRITE_SHARE)

    def _checkpoint(self, snapshot: _Snapshot) -> Checkpoint:
        agent_states: dict[str, Any] = {
            name: self._member_state(state, since, snapshot.thread_len)
            for name, (state, since) in snapshot.members.items()
        }
        agent_states[self._manager_name] = {**snapshot.manager, "message_thread": self._thread[: snapshot.thread_len]}
        # built from parts that are valid already: validating the whole conversation again at every turn would
        # cost more than the rest of the checkpoint
        return Checkpoint.model_construct(
            segment=self._base.segment,
            state={**TeamState.model_construct(agent_states={}).model_dump(), "agent_states": agent_states},
            selector_position=snapshot.selector_position,
            transcript=[*self._base.transcript, *self._transcript[: snapshot.transcript_len]],
            asked_by=self._base.asked_by,
            between_turns=True,
            termination=snapshot.termination,
            updated_at=utcnow(),
        )

    def _member_state(self, state: _Sent | None, since: int, upto: int) -> dict[str, Any]:
        out = dict(state.read() if state is not None else {"agent_state": {}})
        buffered = [self._thread[i] for i in range(since, upto) if self._buffered[i]]
        out["message_buffer"] = [*out.get("message_buffer", []), *buffered]
        return out


def _whole(state: dict[str, Any] | None) -> _Sent | None:
    return _Sent.whole(state) if state is not None else None


async def _manager_state(manager: Any) -> dict[str, Any]:
    """The manager's own state without its thread (kept here message by message): saving it whole at every
    turn would cost the whole conversation's dump each time."""
    thread, manager._message_thread = manager._message_thread, []
    try:
        return dict(await manager.save_state())
    finally:
        manager._message_thread = thread
