"""The AgentChat team of one run, as the manager's process sees it.

Participants are stand-ins with each member's name, description and handoffs (what AgentChat's manager and
its checks read); their containers live in the members' agent processes, so their agent types are marked
remote on the run's runtime. The team id is pinned to the run id, so every process derives the same agent
and topic types.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import reduce
from typing import Any

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import ChatAgent, Handoff, TerminationCondition
from autogen_agentchat.base import Team as AgentChatTeam
from autogen_agentchat.conditions import (
    HandoffTermination,
    MaxMessageTermination,
    TextMentionTermination,
    TimeoutTermination,
    TokenUsageTermination,
)
from autogen_agentchat.teams import BaseGroupChat, RoundRobinGroupChat, SelectorGroupChat, Swarm
from autogen_agentchat.teams._group_chat._base_group_chat_manager import BaseGroupChatManager
from autogen_agentchat.teams._group_chat._events import GroupChatAgentResponse
from autogen_core.models import ChatCompletionClient, ModelFamily, ModelInfo
from autogen_ext.models.replay import ReplayChatCompletionClient

from agent.protocol import AgentDefinition
from agent.runtime import NatsAgentRuntime
from agent.teamprotocol import answer_output
from control.teams.models import USER, Team, Termination

__all__ = [
    "OnTurn",
    "build_team",
    "handoff_names",
    "restore_termination",
    "termination_condition",
    "termination_counters",
]

OnTurn = Callable[[BaseGroupChatManager], Awaitable[None]]
"""Called by the manager between two turns: the last message is in its thread, the next speaker not yet chosen."""

_STAND_IN = ModelInfo(
    vision=False, function_calling=True, json_output=False, family=ModelFamily.UNKNOWN, structured_output=False
)


def termination_condition(spec: Termination) -> TerminationCondition:
    conditions: list[TerminationCondition] = []
    if spec.max_messages is not None:
        conditions.append(MaxMessageTermination(spec.max_messages))
    if spec.text_mention is not None:
        conditions.append(TextMentionTermination(spec.text_mention))
    if spec.handoff_to_user:
        conditions.append(HandoffTermination(target=USER))
    if spec.timeout_s is not None:
        conditions.append(TimeoutTermination(spec.timeout_s))
    if spec.max_tokens is not None:
        conditions.append(TokenUsageTermination(max_total_token=spec.max_tokens))
    return reduce(lambda a, b: a | b, conditions)


_COUNTERS: dict[type[TerminationCondition], tuple[str, ...]] = {
    MaxMessageTermination: ("_message_count",),
    TokenUsageTermination: ("_total_token_count", "_prompt_token_count", "_completion_token_count"),
}
"""What the conditions of :func:`termination_condition` have counted; AgentChat saves none of it with a team."""


def _leaves(condition: TerminationCondition) -> list[TerminationCondition]:
    inner = getattr(condition, "_conditions", None)  # AgentChat's `|` (OrTermination)
    return [leaf for c in inner for leaf in _leaves(c)] if inner is not None else [condition]


def termination_counters(condition: TerminationCondition) -> list[dict[str, float]]:
    """What each condition has counted so far in this run (messages, tokens, seconds), in order: a run resumed
    between two turns must stop where the unbroken run would have (AgentChat resets them only when a run ends)."""
    out: list[dict[str, float]] = []
    for leaf in _leaves(condition):
        counted = {name: getattr(leaf, name) for name in _COUNTERS.get(type(leaf), ())}
        if isinstance(leaf, TimeoutTermination):
            counted["elapsed_s"] = time.monotonic() - leaf._start_time
        out.append(counted)
    return out


def restore_termination(condition: TerminationCondition, counters: list[dict[str, float]]) -> None:
    """Put back :func:`termination_counters` into the same conditions of a new run (the seconds a timeout had
    counted too, so the time the run was broken off does not count)."""
    leaves = _leaves(condition)
    if len(leaves) != len(counters):
        raise ValueError("the team's termination conditions changed since the checkpoint")
    for leaf, counted in zip(leaves, counters, strict=True):
        for name in _COUNTERS.get(type(leaf), ()):
            if name in counted:
                setattr(leaf, name, type(getattr(leaf, name))(counted[name]))
        if isinstance(leaf, TimeoutTermination) and "elapsed_s" in counted:
            leaf._start_time = time.monotonic() - counted["elapsed_s"]


def handoff_names(team: Team, members: dict[str, AgentDefinition]) -> dict[str, list[str]]:
    """Each member's handoff targets by name (``user`` stays ``user``)."""
    return {
        agent_id: [target if target == USER else members[target].name for target in team.handoffs.get(agent_id, [])]
        for agent_id in team.members
    }


def build_team(
    team: Team,
    members: dict[str, AgentDefinition],
    runtime: NatsAgentRuntime,
    team_key: str,
    selector_client: ChatCompletionClient | None = None,
    on_turn: OnTurn | None = None,
) -> BaseGroupChat:
    handoffs = handoff_names(team, members)
    stand_ins: list[ChatAgent] = [
        AssistantAgent(
            members[agent_id].name,
            model_client=ReplayChatCompletionClient([], model_info=_STAND_IN),  # never called: the member answers
            handoffs=list[Handoff | str](handoffs[agent_id]) or None,
        )
        for agent_id in team.members
    ]
    termination = termination_condition(team.termination)
    chat: BaseGroupChat
    if team.mode == "round_robin":
        chat = RoundRobinGroupChat(
            list[ChatAgent | AgentChatTeam](stand_ins), termination_condition=termination, runtime=runtime
        )
    elif team.mode == "selector":
        assert team.selector is not None and selector_client is not None
        extra: dict[str, Any] = {"selector_prompt": team.selector.prompt} if team.selector.prompt else {}
        chat = SelectorGroupChat(
            list[ChatAgent | AgentChatTeam](stand_ins),
            model_client=selector_client,
            termination_condition=termination,
            allow_repeated_speaker=team.selector.allow_repeated_speaker,
            runtime=runtime,
            **extra,
        )
    else:
        chat = Swarm(stand_ins, termination_condition=termination, runtime=runtime)
    _pin_team_key(chat, team_key)
    if on_turn is not None:
        _wrap_turns(chat, on_turn)
    for topic_type in chat._participant_topic_types:
        runtime.mark_remote(topic_type)
    runtime.derive(GroupChatAgentResponse, answer_output)  # the output's messages of members' answers
    # The manager's topics, subscribed when the runtime starts (with the round trip it waits anyway) rather
    # than one round trip each when the team first runs.
    manager = chat._group_chat_manager_topic_type  # its agent type too
    runtime.listen_ahead([manager, chat._group_topic_type, chat._output_topic_type], direct_to=[manager])
    return chat


def _pin_team_key(chat: BaseGroupChat, key: str) -> None:
    """AgentChat gives every team object a fresh uuid and no setter; the types derive from it."""
    chat._team_id = key
    chat._group_topic_type = f"group_topic_{key}"
    chat._group_chat_manager_topic_type = f"{chat._group_chat_manager_name}_{key}"
    chat._participant_topic_types = [f"{name}_{key}" for name in chat._participant_names]
    chat._output_topic_type = f"output_topic_{key}"


def _wrap_turns(chat: BaseGroupChat, on_turn: OnTurn) -> None:
    """Call ``on_turn`` each time the manager is about to choose the next speaker. AgentChat has no hook there;
    the manager is made by a factory when the team first runs, so wrap the factory and the manager's step."""
    make_factory = chat._create_group_chat_manager_factory

    def factory(**kwargs: Any) -> Callable[[], Any]:
        make = make_factory(**kwargs)

        def build() -> Any:
            manager = make()
            assert isinstance(manager, BaseGroupChatManager)
            transition = manager._transition_to_next_speakers

            async def turn(cancellation_token: Any) -> None:
                await on_turn(manager)
                await transition(cancellation_token)

            manager._transition_to_next_speakers = turn  # type: ignore[method-assign]
            return manager

        return build

    chat._create_group_chat_manager_factory = factory  # type: ignore[method-assign,assignment]
