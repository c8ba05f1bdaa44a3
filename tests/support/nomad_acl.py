"""Reads a Nomad ACL policy file (HCL) into the Nomad double's :class:`~tests.support.nomad_double.Policy`, so that
tests can run Caravan with the very token an operator makes from ``nomad/caravan-policy.hcl``.

It knows the part of Nomad's policy language the double models (``acl/policy.go``): ``namespace "<glob>"`` blocks
with ``capabilities`` and a ``variables`` block of ``path "<glob>" { capabilities = [...] }``. Anything else (a
``policy = "read"`` shorthand, ``node``, ``agent``, ``operator``, ``host_volume`` rules) is refused, naming it,
rather than read as granting nothing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.support.nomad_double import Policy

__all__ = ["load_policy", "parse_hcl"]

_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|//[^\n]*|/\*.*?\*/          # space and comments
    |(?P<string>"(?:[^"\\\n]|\\.)*")
    |(?P<ident>[A-Za-z_][A-Za-z0-9_-]*)
    |(?P<punct>[{}\[\]=,])""",
    re.VERBOSE | re.DOTALL,
)

Body = list[tuple[str, list[str] | None, Any]]
"""An HCL body in order: ``(name, labels, value)``; an attribute's labels are None and its value is its value, a
block's value is its body."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"unexpected {text[pos : pos + 20]!r} at offset {pos}")
        pos = match.end()
        kind = match.lastgroup
        if kind is not None:
            out.append((kind, match.group(kind)))
    return out


def parse_hcl(text: str) -> Body:
    """The body of an HCL file of blocks, string labels, and attributes whose values are strings, identifiers
    (``true``) or lists of strings."""
    tokens = _tokens(text)
    pos = 0

    def take(kind: str, value: str | None = None) -> str:
        nonlocal pos
        if pos >= len(tokens) or tokens[pos][0] != kind or (value is not None and tokens[pos][1] != value):
            found = tokens[pos][1] if pos < len(tokens) else "the end"
            raise ValueError(f"expected {value or kind}, found {found!r}")
        pos += 1
        return tokens[pos - 1][1]

    def string(raw: str) -> str:
        return re.sub(r"\\(.)", r"\1", raw[1:-1])

    def value() -> Any:
        nonlocal pos
        kind, raw = tokens[pos]
        if kind == "string":
            pos += 1
            return string(raw)
        if kind == "ident":
            pos += 1
            return raw
        take("punct", "[")
        items = []
        while tokens[pos] != ("punct", "]"):
            items.append(value())
            if tokens[pos] == ("punct", ","):
                pos += 1
        take("punct", "]")
        return items

    def body(closing: bool) -> Body:
        nonlocal pos
        out: Body = []
        while pos < len(tokens) and not (closing and tokens[pos] == ("punct", "}")):
            name = take("ident")
            if tokens[pos] == ("punct", "="):
                pos += 1
                out.append((name, None, value()))
                continue
            labels = []
            while tokens[pos][0] == "string":
                labels.append(string(take("string")))
            take("punct", "{")
            out.append((name, labels, body(closing=True)))
            take("punct", "}")
        return out

    return body(closing=False)


def load_policy(path: Path) -> Policy:
    """The double's :class:`Policy` for the ACL policy file at ``path``."""
    policy = Policy()
    for name, labels, content in parse_hcl(path.read_text()):
        if name != "namespace" or labels is None or len(labels) != 1:
            raise ValueError(f"{path.name}: the Nomad double models no {name!r} rule")
        capabilities = policy.namespaces.setdefault(labels[0], set())
        for key, inner, value in content:
            if key == "capabilities" and inner is None:
                capabilities.update(value)
            elif key == "variables" and inner == []:
                for path_block, path_labels, rules in value:
                    if path_block != "path" or path_labels is None or len(path_labels) != 1:
                        raise ValueError(f"{path.name}: unexpected {path_block!r} in variables of {labels[0]!r}")
                    if [(k, inner) for k, inner, _ in rules] != [("capabilities", None)]:
                        raise ValueError(f"{path.name}: path {path_labels[0]!r} must hold capabilities alone")
                    policy.variables.setdefault(path_labels[0], set()).update(rules[0][2])
            else:
                raise ValueError(f"{path.name}: the Nomad double models no {key!r} in namespace {labels[0]!r}")
    return policy
