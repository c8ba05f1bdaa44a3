"""The wire protocol of team runs: how the group-chat manager enlists members and how each side knows the
other is alive. Beside :mod:`agent.protocol`, which it extends; both sides import it.

Subjects (``{c}`` customer id, ``{a}`` agent id, ``{r}`` run id, ``{t}`` team id, ``{k}`` task id):

- ``caravan.rt.{c}.join.{a}``      request/reply, queue group per agent: one replica hosts the member for a run
- ``caravan.rt.{c}.{r}.>``         the run's :class:`~agent.runtime.NatsAgentRuntime` namespace
- ``caravan.rt.{c}.{r}.x.alive``   heartbeats of the manager (``manager``) and of every member (``member {a}
                                   <instance>``); a member that leaves the run before its end (its agent stops or is
                                   halted) says so there at once (``member {a} <instance> left``)
- ``caravan.rt.{c}.{r}.x.end``     the run is over: members drop their containers
- ``caravan.rt.{c}.{r}.x.state``   a member's state after each of its turns (or a delta to the one before), for the
                                   manager's checkpoints
- ``caravan.tasks.{c}.team.{t}``   work queue (``CARAVAN_TASKS``) of :class:`TeamTaskRequest` for the managers
- ``caravan.ctl.{c}.teamcancel.{k}`` cancel a team task wherever its manager runs
"""

from __future__ import annotations

from typing import Any, Literal

from autogen_agentchat.teams._group_chat._events import GroupChatAgentResponse, GroupChatMessage
from pydantic import BaseModel, Field, TypeAdapter, field_validator

from agent.protocol import _check_id, utcnow

__all__ = [
    "ADDED_CONTEXT",
    "MODEL_POSITION",
    "STATE_AFTER_HEADER",
    "STATE_BASE_HEADER",
    "STATE_MEMBER_HEADER",
    "TEAM_CONSUMER",
    "TEAM_QUEUE_FILTER",
    "MemberJoin",
    "MemberJoined",
    "MemberRefused",
    "TeamTaskRequest",
    "answer_output",
    "apply_state_delta",
    "join_answer",
    "join_subject",
    "run_namespace",
    "team_cancel_subject",
    "team_task_subject",
]

TEAM_CONSUMER = "caravan-teams"
"""The durable consumer on the team task queue that the control plane's replicas share."""
TEAM_QUEUE_FILTER = "caravan.tasks.*.team.*"
STATE_MEMBER_HEADER = "Caravan-Member"
"""On ``x.state``: the member's name; the body is its ``ChatAgentContainer`` state (JSON)."""
STATE_AFTER_HEADER = "Caravan-After"
"""On ``x.state``: the id of the chat message the member answered with; its state follows that answer."""
STATE_BASE_HEADER = "Caravan-Base"
"""On ``x.state``: the body is not the whole state but what changed since the state the member sent after this
message id (:func:`apply_state_delta`); only to a manager that asked for deltas (``MemberJoin.state_deltas``)."""
MODEL_POSITION = "caravan_model_position"
"""In a member's state beside AgentChat's: the scripted model's place (the `replay` provider)."""
ADDED_CONTEXT = "llm_context_added"
"""In a state delta: the dumps of the model context's messages added since the base state."""


def apply_state_delta(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """The member's whole ``ChatAgentContainer`` state from the one it sent before and a delta to it.

    Between two turns an ``AssistantAgent``'s model context only grows, and the rest of the container's state
    is small: a delta is the context's new messages plus the rest whole, so a turn does not send (nor dump) the
    whole conversation again. Neither argument is changed: states already sent stay as they were."""
    agent_state = dict(base["agent_state"])
    llm_context = dict(agent_state["llm_context"])
    llm_context["messages"] = [*llm_context["messages"], *delta[ADDED_CONTEXT]]
    agent_state["llm_context"] = llm_context
    state = {key: value for key, value in base.items() if key != MODEL_POSITION}
    state.update({key: value for key, value in delta.items() if key != ADDED_CONTEXT})
    state["agent_state"] = agent_state
    return state


def answer_output(answer: GroupChatAgentResponse) -> GroupChatMessage:
    """The message for the team's output that a member's answer stands for (``MemberJoin.output_implied``): the
    one AgentChat's container publishes for the output topic just before the answer, with the same chat
    message."""
    return GroupChatMessage(message=answer.response.chat_message)


def run_namespace(customer_id: str, run_id: str) -> str:
    return f"caravan.rt.{_check_id(customer_id)}.{_check_id(run_id)}"


def join_subject(customer_id: str, agent_id: str) -> str:
    return f"caravan.rt.{_check_id(customer_id)}.join.{_check_id(agent_id)}"


def team_task_subject(customer_id: str, team_id: str) -> str:
    return f"caravan.tasks.{_check_id(customer_id)}.team.{_check_id(team_id)}"


def team_cancel_subject(customer_id: str, task_id: str) -> str:
    return f"caravan.ctl.{_check_id(customer_id)}.teamcancel.{_check_id(task_id)}"


class MemberJoin(BaseModel):
    """Host this agent's container for one run of a team (AgentChat's ``ChatAgentContainer``)."""

    run_id: str
    task_id: str
    customer_id: str
    agent_id: str
    team_key: str = Field(description="AgentChat's team id of the run: types are `<name>_<team_key>`.")
    handoffs: list[str] = Field(default_factory=list, description="Member names (or `user`) it may hand off to.")
    heartbeat_s: float = 1.0
    manager_lost_after_s: float = 30.0
    state_deltas: bool = False
    """The manager takes a member's states as deltas to the one before (``STATE_BASE_HEADER``); older managers
    do not, and get whole states."""
    states: bool = True
    """The manager checkpoints the run between turns, from the state each member sends after each of its turns
    (``x.state``); one that keeps no checkpoints (AgentChat's team on the runtime alone) says False, and gets
    none."""
    output_implied: bool = False
    """The manager's process derives the message of each answer for the team's output from the answer for the
    group (:func:`answer_output`), which the member then sends alone, as implying the other
    (``NatsAgentRuntime.publish_message(implied=...)``); older managers do not, and get both."""

    @field_validator("run_id", "task_id", "customer_id", "agent_id")
    @classmethod
    def _ids(cls, value: str) -> str:
        return _check_id(value)


class MemberJoined(BaseModel):
    agent_id: str
    instance_id: str
    """The replica (allocation) that hosts the member for this run; every message of the run goes there."""
    checkpoints: bool = False
    """The member sends its state on ``x.state`` after each turn, as the join asked (older agents do not: the
    manager then checkpoints only when the team asks the human)."""


class MemberRefused(BaseModel):
    """A replica's answer to a join it cannot carry out (it could not set up the member's run): the manager ends
    the run with ``refused`` at once, rather than wait for a member that will not come. An older manager cannot
    read it as a :class:`MemberJoined`, and fails the run all the same."""

    agent_id: str
    refused: str


def join_answer(data: bytes) -> MemberJoined | MemberRefused:
    """A replica's answer to a join."""
    return _JOIN_ANSWER.validate_json(data)


_JOIN_ANSWER: TypeAdapter[MemberJoined | MemberRefused] = TypeAdapter(MemberJoined | MemberRefused)


class TeamTaskRequest(BaseModel):
    """A team task for a manager: the start, or the human's answer after the team asked for input."""

    task_id: str
    customer_id: str
    team_id: str
    kind: Literal["start", "input"] = "start"
    content: str
    segment: int = Field(default=0, description="How many times the team has run for this task before.")
    submitted_at: str = Field(default_factory=lambda: utcnow().isoformat())

    @field_validator("task_id", "customer_id", "team_id")
    @classmethod
    def _ids(cls, value: str) -> str:
        return _check_id(value)
