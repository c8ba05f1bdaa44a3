"""Teams: which agents talk, how the next speaker is chosen, and when the conversation ends."""

from __future__ import annotations

from datetime import datetime
from string import Formatter
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, field_validator, model_validator

from agent.protocol import ID_PATTERN, ModelConfig, utcnow
from control.models import USER, DisplayName, NotBlank  # USER: the handoff target that asks the human

__all__ = ["USER", "Checkpoint", "SelectorSpec", "Team", "TeamCreate", "TeamInput", "TeamMode", "Termination"]

SELECTOR_PROMPT_FIELDS = frozenset({"roles", "participants", "history"})
"""What AgentChat fills in a selector prompt."""

TeamMode = Literal["round_robin", "selector", "swarm"]
AgentRef = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
HandoffTarget = Annotated[str, StringConstraints(pattern=f"^({ID_PATTERN[1:-1]}|{USER})$")]


class Termination(BaseModel):
    """When the team stops; several conditions end it at the first that holds (AgentChat's ``|``). Strict, as
    every input of a team: numbers and booleans are JSON's own (an integer is taken for a float)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    max_messages: int | None = Field(default=None, ge=1, le=10_000, description="Messages, the task's included.")
    text_mention: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
        default=None, description="Stop when a message contains this text (e.g. `TERMINATE`)."
    )
    handoff_to_user: bool = Field(
        default=False, description="Stop and ask the human when a member hands off to `user` (task `awaiting_input`)."
    )
    timeout_s: float | None = Field(default=None, gt=0, le=86_400, description="Stop after this many seconds.")
    max_tokens: int | None = Field(default=None, ge=1, le=100_000_000, description="Stop after this token usage.")

    @model_validator(mode="after")
    def _something(self) -> Termination:
        if not (self.max_messages or self.text_mention or self.handoff_to_user or self.timeout_s or self.max_tokens):
            raise ValueError("give at least one termination condition, e.g. max_messages")
        return self


class SelectorSpec(BaseModel):
    """Mode `selector`: a model reads the conversation and names the next speaker."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: ModelConfig
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=20_000)] | None = Field(
        default=None, description="AgentChat's selector prompt with `{roles}`, `{participants}` and `{history}`."
    )
    allow_repeated_speaker: bool = False

    @field_validator("model")
    @classmethod
    def _names_a_speaker(cls, value: ModelConfig) -> ModelConfig:
        """A selector's answer is the next speaker's name: AgentChat takes text only (a scripted tool call failed
        the task with a bare ``AssertionError``)."""
        if any(not isinstance(response, str) for response in value.responses):
            raise ValueError("a selector's scripted responses name the next speaker: text, not tool calls")
        return value

    @field_validator("prompt")
    @classmethod
    def _placeholders(cls, value: str | None) -> str | None:
        """Only the three names, as they are: AgentChat formats the prompt with ``str.format``, where a field may
        also read attributes and items of its value (``{roles.__class__}``) and pad it to any width
        (``{history:>999999999}``: a prompt of a gigabyte). Literal braces are written doubled."""
        if value is None:
            return value
        allowed = "{roles}, {participants} and {history}"
        try:
            fields = [
                (name, spec, conversion) for _, name, spec, conversion in Formatter().parse(value) if name is not None
            ]
        except ValueError as exc:  # a lone brace
            raise ValueError(
                f"prompt may use only {allowed} in braces, and '{{{{' or '}}}}' for a brace ({exc})"
            ) from None
        for name, spec, conversion in fields:
            if name not in SELECTOR_PROMPT_FIELDS or spec or conversion:
                shown = f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"[:60]
                raise ValueError(f"prompt may use only {allowed} in braces, as they are, not {shown}")
        return value


class TeamCreate(BaseModel):
    """A team's definition. Strict, as :class:`Termination`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: DisplayName
    members: Annotated[list[AgentRef], Field(min_length=1, max_length=16)] = Field(
        description="Agent IDs of your agents, in order (round robin order; a swarm starts with the first)."
    )
    mode: TeamMode = "round_robin"
    selector: SelectorSpec | None = Field(default=None, description="Required for mode `selector`, only there.")
    handoffs: dict[AgentRef, Annotated[list[HandoffTarget], Field(max_length=17)]] = Field(
        default_factory=dict,
        description="Whom each member may hand off to: member agent IDs, or `user` to ask the human.",
    )
    termination: Termination

    @model_validator(mode="after")
    def _consistent(self) -> TeamCreate:
        if len(set(self.members)) != len(self.members):
            raise ValueError("members must not repeat")
        if (self.mode == "selector") != (self.selector is not None):
            raise ValueError("selector is required for mode 'selector' and only allowed there")
        for source, targets in self.handoffs.items():
            if source not in self.members:
                raise ValueError(f"handoffs: {source} is not a member")
            for target in targets:
                if target != USER and target not in self.members:
                    raise ValueError(f"handoffs: {source} may hand off only to members or 'user', not {target}")
                if target == source:
                    raise ValueError(f"handoffs: {source} cannot hand off to itself")
            if len(set(targets)) != len(targets):
                raise ValueError(f"handoffs of {source} repeat")
        if self.mode == "swarm" and not self.handoffs.get(self.members[0]):
            raise ValueError("a swarm starts with its first member, which needs handoffs")
        if (
            self.mode == "swarm"
            and not self.termination.handoff_to_user
            and any(USER in t for t in self.handoffs.values())
        ):
            raise ValueError(
                "a swarm's handoff to 'user' needs termination.handoff_to_user: true (to stop and ask the human; "
                "the swarm has no member 'user' to give the turn to)"
            )
        if self.mode == "selector" and len(self.members) < 2:
            raise ValueError("mode 'selector' needs at least two members, for its model to choose from")
        if self.termination.handoff_to_user and not any(USER in t for t in self.handoffs.values()):
            raise ValueError("termination.handoff_to_user needs a member with a handoff to 'user'")
        return self


class Team(BaseModel):
    id: str
    customer_id: str
    name: str
    members: list[str]
    mode: TeamMode
    selector: SelectorSpec | None = None
    handoffs: dict[str, list[str]] = Field(default_factory=dict)
    termination: Termination
    created_at: datetime = Field(default_factory=utcnow)
    deleting_until: datetime | None = None
    """Set while a delete looks for the team's unfinished tasks (until then, or its control plane died): a task
    made meanwhile is refused, or ended if it was queued already. Not shown to clients."""

    def deleting(self) -> bool:
        return self.deleting_until is not None and self.deleting_until > utcnow()


class TeamInput(BaseModel):
    """The human's answer to a team that asked (``POST /v1/tasks/{id}/input``)."""

    model_config = ConfigDict(extra="forbid")

    content: Annotated[str, StringConstraints(min_length=1, max_length=100_000), NotBlank]
    segment: StrictInt | None = Field(
        default=None,
        ge=1,
        description="The question this answers: the `segment` of the task (and of its `awaiting_input` status and "
        "`input_request` event). Given, an answer to a question no longer waiting (answered already: a client's "
        "retry) is 409, never taken for the next question.",
    )


class Checkpoint(BaseModel):
    """A team task in JetStream KV: AgentChat's team state after the last message (or when it last stopped to ask
    the human), and the transcript so far, replayed as the events of a new attempt when a run has to go on."""

    segment: int = 0
    state: dict[str, Any] | None = None
    selector_position: int | None = None
    transcript: list[dict[str, Any]] = Field(default_factory=list)
    asked_by: str | None = None
    between_turns: bool = Field(
        default=False,
        description="Saved between two turns of a run: the run's input is in `state`; a new attempt goes on "
        "from it with no new input.",
    )
    termination: list[dict[str, float]] | None = Field(
        default=None, description="What the termination conditions had counted (between turns)."
    )
    updated_at: datetime = Field(default_factory=utcnow)
