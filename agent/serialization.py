"""Messages of the agent runtime on the wire: JSON by type name, with AgentChat's messages rebuilt on the way in.

AgentChat's group-chat events hold abstract fields (``BaseChatMessage``, ``BaseAgentEvent``): pydantic writes
the concrete message but cannot read it back. Every dict whose ``type`` names a message known to AgentChat's
``MessageFactory`` is therefore rebuilt through the factory before the outer type is validated.

Type names are looked up in a registry, never imported: a peer cannot make this process load a module.
Types are registered on first send as well, so a process can read back what it sends.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from autogen_agentchat.messages import MessageFactory
from autogen_agentchat.teams._group_chat._events import (
    GroupChatAgentResponse,
    GroupChatError,
    GroupChatMessage,
    GroupChatPause,
    GroupChatRequestPublish,
    GroupChatReset,
    GroupChatResume,
    GroupChatStart,
    GroupChatTeamResponse,
    GroupChatTermination,
)
from autogen_core import MessageSerializer
from autogen_core._serialization import DataclassJsonMessageSerializer, PydanticJsonMessageSerializer
from pydantic import BaseModel, TypeAdapter

__all__ = ["GROUP_CHAT_TYPES", "MessageCodec", "UnknownMessageType", "type_name"]

GROUP_CHAT_TYPES: tuple[type[BaseModel], ...] = (
    GroupChatStart,
    GroupChatAgentResponse,
    GroupChatTeamResponse,
    GroupChatRequestPublish,
    GroupChatMessage,
    GroupChatTermination,
    GroupChatReset,
    GroupChatPause,
    GroupChatResume,
    GroupChatError,
)
"""What AgentChat's teams send between their manager and participants."""

NONE = "none"


class UnknownMessageType(LookupError):
    """A message of a type this process has no serializer for."""


def type_name(cls: type) -> str:
    """The wire name of a type: its qualified name, as autogen_core names types (modules differ between
    processes: a class defined in a script is ``__main__.X`` there)."""
    return cls.__qualname__


class MessageCodec:
    """Encode and decode runtime messages; pydantic models and dataclasses are known on first use."""

    def __init__(self, types: Iterable[type] = GROUP_CHAT_TYPES, factory: MessageFactory | None = None) -> None:
        self._factory = factory or MessageFactory()
        self._types: dict[str, type] = {}
        self._adapters: dict[str, TypeAdapter[Any]] = {}
        self._custom: dict[str, MessageSerializer[Any]] = {}
        for cls in types:
            self.register(cls)

    @property
    def factory(self) -> MessageFactory:
        return self._factory

    def register(self, cls: type) -> str:
        name = type_name(cls)
        if name not in self._types:
            if not (isinstance(cls, type) and (issubclass(cls, BaseModel) or dataclasses.is_dataclass(cls))):
                raise UnknownMessageType(f"{name} is neither a pydantic model nor a dataclass; add a serializer")
            self._types[name] = cls
            if not issubclass(cls, BaseModel):
                self._adapters[name] = TypeAdapter(cls)
        return name

    def add_serializer(self, serializer: MessageSerializer[Any]) -> None:
        """Serializers for other kinds of message (protobuf); pydantic models and dataclasses are ours, with the
        AgentChat rebuild (autogen_core's JSON serializers, which AgentChat registers, cannot read them back)."""
        if isinstance(serializer, PydanticJsonMessageSerializer | DataclassJsonMessageSerializer):
            self.register(serializer.cls)
            return
        self._custom[serializer.type_name] = serializer

    def encode(self, message: Any) -> tuple[str, bytes]:
        if message is None:
            return NONE, b""
        cls = type(message)
        name = type_name(cls)
        custom = self._custom.get(name)
        if custom is not None:
            return custom.type_name, custom.serialize(message)
        name = self.register(cls)
        if isinstance(message, BaseModel):
            return name, message.model_dump_json(serialize_as_any=True).encode()
        return name, self._adapters[name].dump_json(message, serialize_as_any=True)

    def decode(self, name: str, data: bytes) -> Any:
        if name == NONE:
            return None
        custom = self._custom.get(name)
        if custom is not None:
            return custom.deserialize(data)
        cls = self._types.get(name)
        if cls is None:
            raise UnknownMessageType(f"no serializer for message type {name!r} in this process")
        raw = self.rebuild(json.loads(data))
        if issubclass(cls, BaseModel):
            return cls.model_validate(raw)
        return self._adapters[name].validate_python(raw)

    def rebuild(self, value: Any) -> Any:
        """``value`` with every dict that is an AgentChat message (or event) turned back into that message."""
        if isinstance(value, list):
            return [self.rebuild(item) for item in value]
        if not isinstance(value, dict):
            return value
        kind = value.get("type")
        if isinstance(kind, str) and kind in self._factory._message_types:  # no public lookup by name
            return self._factory.create(value)
        return {key: self.rebuild(item) for key, item in value.items()}

    def dumps_state(self, state: Any) -> bytes:
        return json.dumps(state, default=_json_default).encode()

    @staticmethod
    def loads_state(data: bytes) -> Any:
        return json.loads(data)


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot put a {type(value).__name__} in JSON")
