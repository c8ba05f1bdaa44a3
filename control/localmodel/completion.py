"""A streamed chat completion put back together as the one answer a client that did not stream asked for.

The proxy asks the server for every answer streamed, as only a streamed answer stops when its client goes; a
client that did not ask for a stream gets the ``chat.completion`` the chunks add up to: the text, the tool
calls (streamed as pieces keyed by their index: the id, type and name first, then the arguments a piece at
a time), the finish reason and the usage the stream ends with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Completion"]


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    role: str = "assistant"
    finish_reason: str | None = None

    def add(self, delta: dict[str, Any]) -> None:
        self.role = delta.get("role") or self.role
        if delta.get("content"):
            self.text.append(delta["content"])
        for piece in delta.get("tool_calls") or []:
            call = self.calls.setdefault(
                piece.get("index", len(self.calls)),
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            call["id"] = piece.get("id") or call["id"]
            call["type"] = piece.get("type") or call["type"]
            function = piece.get("function") or {}
            call["function"]["name"] += function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""

    def message(self) -> dict[str, Any]:
        text = "".join(self.text)
        if not self.calls:
            return {"role": self.role, "content": text}
        calls = [self.calls[index] for index in sorted(self.calls)]
        return {"role": self.role, "content": text or None, "tool_calls": calls}


@dataclass
class Completion:
    """Chunks of a chat completion stream, added one by one; ``finished`` once every choice has its reason."""

    head: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    pieces: int = 0  # chunks with text or a piece of a tool call: the proxy's count when the server gives none
    _choices: dict[int, _Choice] = field(default_factory=dict)

    def add(self, chunk: dict[str, Any]) -> None:
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            self.pieces += 1 if delta.get("content") or delta.get("tool_calls") else 0
            answer = self._choices.setdefault(choice.get("index", 0), _Choice())
            answer.add(delta)
            answer.finish_reason = choice.get("finish_reason") or answer.finish_reason

    @property
    def finished(self) -> bool:
        return bool(self._choices) and all(c.finish_reason for c in self._choices.values())

    def result(self, usage: dict[str, Any]) -> dict[str, Any]:
        choices = [
            {"index": index, "message": c.message(), "logprobs": None, "finish_reason": c.finish_reason}
            for index, c in sorted(self._choices.items())
        ]
        return {
            "id": self.head.get("id", "chatcmpl-local"),
            "object": "chat.completion",
            "created": self.head.get("created", 0),
            "model": self.head.get("model", "local"),
            "choices": choices,
            "usage": usage,
        }
