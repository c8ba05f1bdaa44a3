"""How a route reads a JSON body: as FastAPI does (``json.loads`` of the bytes), but refusing an object that names a
key twice, a body whose content type declares a charset other than UTF-8, and a body in UTF-16 or UTF-32 that
declares none (``json.loads`` reads those by their bytes).

``json.loads`` keeps the last of a key's values: a proxy or a firewall in front that reads the first would judge a
request other than the one served. The refusals are raised from ``Request.json()``, which FastAPI calls before a
route's dependencies and answers with its 400 "There was an error parsing the body" raised from them;
:mod:`gateway.errors` says what it was (422, 415), once the caller is known."""

from __future__ import annotations

import email.message
import email.utils
import json
import re
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

__all__ = ["DuplicateKey", "NotUtf8", "NumberTooLong", "StrictJsonRequest", "StrictJsonRoute", "loads"]

_SHOWN = 100  # characters of a key shown, and of a path's start and of its end
_UTF8 = ("utf-8", "utf8")
_READ_AS_UTF8 = ("utf-8", "utf-8-sig")  # what json.detect_encoding says of UTF-8, with or without a byte order mark
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class DuplicateKey(ValueError):
    """A JSON object names ``key`` twice; ``path`` (keys and indexes from the document's top) leads to it."""

    def __init__(self, key: str, path: tuple[str | int, ...]) -> None:
        self.key = key
        self.path = path
        super().__init__(f"duplicate key {_shown(key)} in the JSON object at {_shown_path(path)}")


class NotUtf8(ValueError):
    """A JSON body in ``charset``, which is no UTF-8 (RFC 8259 §8.1: JSON exchanged between systems is UTF-8), as its
    content type ``declared`` it, or else as its first bytes show (UTF-16 or UTF-32, which ``json.loads`` reads
    where a proxy or a firewall in front that reads UTF-8 would see no JSON at all)."""

    def __init__(self, charset: str, declared: bool = True) -> None:
        self.charset = charset
        self.declared = declared
        super().__init__(f"declared charset {charset!r}" if declared else f"a body in {charset}")


class NumberTooLong(ValueError):
    """A JSON integer of more digits than Python converts (``sys.get_int_max_str_digits()``, 4300 by default):
    valid JSON, which ``json.loads`` refuses with a plain ``ValueError``."""

    def __init__(self, digits: int) -> None:
        self.digits = digits
        super().__init__(f"a number of {digits} digits (at most {sys.get_int_max_str_digits()})")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise NumberTooLong(len(text.lstrip("-"))) from None


class _Duplicated(dict[str, Any]):
    """An object read with a key named twice (its last value kept), found again once the whole document is read."""

    def __init__(self, read: dict[str, Any], key: str) -> None:
        super().__init__(read)
        self.key = key


def loads(body: bytes | str) -> Any:
    """``json.loads(body)`` (its errors unchanged), raising :class:`DuplicateKey` for the first object, in document
    order, that names a key twice, at any depth, and :class:`NumberTooLong` for an integer Python will not read."""
    duplicated = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicated
        read = dict(items)
        if len(read) == len(items):
            return read
        duplicated = True
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                return _Duplicated(read, key)
            seen.add(key)
        raise AssertionError("unreachable: fewer keys than pairs")

    value = json.loads(body, object_pairs_hook=pairs, parse_int=_integer)
    if duplicated:
        _refuse_duplicates(value)
    return value


def _refuse_duplicates(document: Any) -> None:
    """Walks ``document`` without recursion (it may nest as deep as the parser goes), in document order, each node
    with a link to its parent's (so that a path is built only for the object refused)."""
    pending: list[tuple[Any, tuple[Any, str | int] | None]] = [(document, None)]
    while pending:
        node, link = pending.pop()
        if isinstance(node, _Duplicated):
            path: list[str | int] = []
            while link is not None:
                link, step = link
                path.append(step)
            raise DuplicateKey(node.key, tuple(reversed(path)))
        if isinstance(node, dict):
            pending.extend((value, (link, key)) for key, value in reversed(node.items()))
        elif isinstance(node, list):
            pending.extend((node[index], (link, index)) for index in range(len(node) - 1, -1, -1))


def _shown(key: str) -> str:
    """A key as JSON writes it (quoted; escapes for what is not printable ASCII), its first 100 characters."""
    return json.dumps(key if len(key) <= _SHOWN else f"{key[:_SHOWN]}...")


def _shown_path(path: tuple[str | int, ...]) -> str:
    """``body.members[0]["a key"]``: a path's middle left out past 200 characters."""
    steps = "".join(
        f"[{step}]"
        if isinstance(step, int)
        else f".{step}"
        if _NAME.fullmatch(step) and len(step) <= _SHOWN
        else f"[{_shown(step)}]"
        for step in path
    )
    shown = f"body{steps}"
    return shown if len(shown) <= 2 * _SHOWN else f"{shown[:_SHOWN]}...{shown[-_SHOWN:]}"


def _declared_charsets(content_type: str) -> list[str]:
    """Every charset ``content_type`` declares (lower case, unquoted), in order: none, mostly."""
    message = email.message.Message()
    message["content-type"] = content_type
    return [
        email.utils.collapse_rfc2231_value(value).strip().lower()
        for name, value in message.get_params(failobj=[])[1:]  # (the first is the type)
        if name.lower() == "charset"
    ]


class StrictJsonRequest(Request):
    """A request whose ``json()`` refuses a charset other than UTF-8, declared or not (:class:`NotUtf8`), and a key
    named twice (:class:`DuplicateKey`). FastAPI calls it for a non-empty body it reads as JSON
    (``application/json``, ``application/*+json``). A UTF-8 byte order mark is skipped, as RFC 8259 allows."""

    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            for charset in _declared_charsets(self.headers.get("content-type", "")):
                if charset not in _UTF8:
                    raise NotUtf8(charset)
            body = await self.body()
            # (it looks for a UTF-16/32 byte order mark, or a NUL byte among the first: UTF-8 JSON has none anywhere)
            encoding = json.detect_encoding(body)
            if encoding not in _READ_AS_UTF8:
                raise NotUtf8(encoding.upper(), declared=False)
            self._strict_json = loads(body)
        return self._strict_json


class StrictJsonRoute(APIRoute):
    """The route class of every router of the API: its body is read by :class:`StrictJsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_json(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_json
