"""What an AgentChat run's stream item becomes on a task's subject: one mapping for agents and teams alike."""

from __future__ import annotations

from typing import Any

from autogen_agentchat.base import TaskResult
from autogen_agentchat.messages import (
    BaseChatMessage,
    ModelClientStreamingChunkEvent,
    ThoughtEvent,
    ToolCallExecutionEvent,
    ToolCallRequestEvent,
)

from agent.protocol import EventKind

__all__ = ["event_fields", "final_text"]


def event_fields(item: Any) -> list[tuple[str, dict[str, Any]]]:
    """The events (kind, fields of :class:`~agent.protocol.Event`) for one item of ``run_stream``."""
    out: list[tuple[str, dict[str, Any]]] = []
    source = getattr(item, "source", None)
    if isinstance(item, ToolCallRequestEvent):
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in item.content]
        out.append((EventKind.TOOL_CALL, {"source": source, "data": {"calls": calls}}))
    elif isinstance(item, ToolCallExecutionEvent):
        results = [{"call_id": r.call_id, "content": r.content, "is_error": bool(r.is_error)} for r in item.content]
        out.append((EventKind.TOOL_RESULT, {"source": source, "data": {"results": results}}))
    elif isinstance(item, ModelClientStreamingChunkEvent):
        out.append(("chunk", {"source": source, "content": item.content}))
    elif isinstance(item, ThoughtEvent):
        out.append((EventKind.MESSAGE, {"source": source, "content": item.content, "data": {"type": "thought"}}))
    elif isinstance(item, BaseChatMessage):
        kind = getattr(item, "type", type(item).__name__)
        out.append((EventKind.MESSAGE, {"source": source, "content": item.to_text(), "data": {"type": kind}}))
    usage = getattr(item, "models_usage", None)
    if usage is not None:
        tokens = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
        out.append((EventKind.USAGE, {"source": source, "data": tokens}))
    return out


def final_text(result: TaskResult | None) -> str | None:
    """The text of the run's last chat message: the task's result."""
    if result is None:
        return None
    for message in reversed(result.messages):
        if isinstance(message, BaseChatMessage):
            return message.to_text()
    return None
