"""Messages of the agent runtime on the wire: JSON by type name, with AgentChat's messages rebuilt on the way in.

AgentChat's group-chat events hold abstract fields (``BaseChatMessage``, ``BaseAgentEvent``): pydantic writes
the concrete message but cannot read it back. Every dict whose ``type`` names a message known to AgentChat's
``MessageFactory`` is therefore rebuilt through the factory before the outer type is validated.

Type names are looked up in a registry, never imported: a peer cannot make this process load a module.
Types are registered on first send as well, so a process can read back what it sends.

Every message of a team run passes here, often in three processes at once, so each type is looked at once, when
it is registered: its serializer and validator are kept, and a type whose fields cannot hold an AgentChat message
(nor anything untyped that might) is validated straight from the JSON bytes, without the rebuild.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import datetime
import decimal
import enum
import types
import typing
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pydantic_core
from autogen_agentchat.messages import BaseMessage, MessageFactory
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
_LEAVES: tuple[type, ...] = (
    str,
    int,
    float,
    bool,
    bytes,
    type(None),
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    decimal.Decimal,
    uuid.UUID,
    enum.Enum,
)
_CONTAINERS: tuple[Any, ...] = (
    typing.Union,
    types.UnionType,
    list,
    tuple,
    set,
    frozenset,
    dict,
    collections.abc.Sequence,
    collections.abc.Mapping,
    collections.abc.Set,
)


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
        self._encoders: dict[type, tuple[str, Callable[[Any], bytes]]] = {}
        self._decoders: dict[str, Callable[[bytes], Any]] = {}
        self._custom: dict[str, MessageSerializer[Any]] = {}
        for cls in types:
            self.register(cls)

    def register(self, cls: type) -> str:
        name = type_name(cls)
        if cls in self._encoders:
            return name
        if not (isinstance(cls, type) and (issubclass(cls, BaseModel) or dataclasses.is_dataclass(cls))):
            raise UnknownMessageType(f"{name} is neither a pydantic model nor a dataclass; add a serializer")
        self._encoders[cls] = (name, _encoder(cls))
        if name not in self._types:  # two classes of one name (``__main__.X``, ``app.X``): the first reads it
            self._types[name] = cls
            self._decoders[name] = self._decoder(cls)
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
        known = self._encoders.get(cls)
        if known is None or self._custom:  # a custom serializer may claim a type's name later
            custom = self._custom.get(type_name(cls))
            if custom is not None:
                return custom.type_name, custom.serialize(message)
            if known is None:
                self.register(cls)
                known = self._encoders[cls]
        name, dump = known
        return name, dump(message)

    def decode(self, name: str, data: bytes) -> Any:
        if name == NONE:
            return None
        decoder = self._decoders.get(name)
        if decoder is None or self._custom:
            custom = self._custom.get(name)
            if custom is not None:
                return custom.deserialize(data)
            if decoder is None:
                raise UnknownMessageType(f"no serializer for message type {name!r} in this process")
        return decoder(data)

    def _decoder(self, cls: type) -> Callable[[bytes], Any]:
        """Straight from the bytes when no field can hold an AgentChat message; else through the rebuild."""
        validator = cls.__pydantic_validator__ if issubclass(cls, BaseModel) else TypeAdapter(cls).validator
        if _plain(cls, set()):
            return validator.validate_json

        def rebuilt(data: bytes) -> Any:
            return validator.validate_python(self.rebuild(pydantic_core.from_json(data)))

        return rebuilt

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

    @staticmethod
    def dumps_state(state: Any) -> bytes:
        """An agent's state as JSON; pydantic models in it are written as pydantic writes them (a member sends
        its state after every turn: pydantic_core writes a delta of three messages in an eighth of the time
        ``json.dumps`` of their dumps took)."""
        return pydantic_core.to_json(state)

    @staticmethod
    def loads_state(data: bytes) -> Any:
        return pydantic_core.from_json(data)


def _encoder(cls: type) -> Callable[[Any], bytes]:
    """``serialize_as_any``: a field declared as AgentChat's abstract message writes the concrete one."""
    serializer = cls.__pydantic_serializer__ if issubclass(cls, BaseModel) else TypeAdapter(cls).serializer

    def dump(message: Any) -> bytes:
        return serializer.to_json(message, serialize_as_any=True)

    return dump


def _plain(annotation: Any, seen: set[int]) -> bool:
    """Whether a value of this annotation can be validated from JSON as it is: it reaches no AgentChat message
    and nothing untyped (``Any``, a bare ``dict``, a class pydantic knows no fields of) that the rebuild would
    turn into one. When unsure, no: the rebuild is always right, only slower."""
    if annotation is None or annotation is type(None):
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _plain(typing.get_args(annotation)[0], seen)
    if origin is typing.Literal:
        return True
    if origin is not None:
        args = typing.get_args(annotation)
        return origin in _CONTAINERS and bool(args) and all(arg is Ellipsis or _plain(arg, seen) for arg in args)
    if not isinstance(annotation, type):
        return False  # Any, a TypeVar, a forward reference
    if issubclass(annotation, _LEAVES):
        return True
    if issubclass(annotation, BaseMessage) or issubclass(BaseMessage, annotation) or id(annotation) in seen:
        return False  # may hold AgentChat's messages (or recursive types): let the rebuild have them
    seen.add(id(annotation))
    try:
        return _plain_fields(annotation, seen)
    finally:
        seen.discard(id(annotation))


def _plain_fields(cls: type, seen: set[int]) -> bool:
    if issubclass(cls, BaseModel):
        fields = [field.annotation for field in cls.model_fields.values()]
        return cls.model_config.get("extra") != "allow" and all(_plain(f, seen) for f in fields)
    if dataclasses.is_dataclass(cls):
        try:
            hints = typing.get_type_hints(cls, include_extras=True)
        except Exception:  # a name that does not resolve here
            return False
        return all(_plain(hints[f.name], seen) for f in dataclasses.fields(cls))
    return False
