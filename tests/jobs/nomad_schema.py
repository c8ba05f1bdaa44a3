"""Exact field-name check for rendered Nomad job JSON (the API form sent to ``POST /v1/jobs``).

Nomad's HTTP agent decodes request bodies with Go's ``encoding/json``, which silently drops keys that match
no struct field, so a misspelt key (``"Memory"`` instead of ``"MemoryMB"``, ``"Port"`` instead of
``"PortLabel"``) produces a job that registers fine but lacks the setting. :func:`unknown_fields` walks a job
dict and returns the path of every key that is not a field of the Nomad API struct at that position.

The field table lives beside this module in ``nomad_api_fields.json``. It was transcribed from the Go structs
in ``hashicorp/nomad``'s ``api/`` package (commit and files are named in its ``_source`` entry): a key is the Go
field name unless a ``json`` tag renames it (``hcl``/``mapstructure`` tags do not apply to JSON), and each value
is ``"leaf"``, a struct name, ``"[]Struct"`` or ``"map[string]Struct"``. Leaves are not descended into, so
free-form maps such as ``Task.Config``, ``Meta``, ``Env`` or ``ScalingPolicy.Policy`` are never checked.

The match is exact-case. That is stricter than Nomad: ``encoding/json`` also accepts a key that differs only
in case (``MemoryMb`` is decoded as ``MemoryMB``), but such keys are reported here as non-canonical.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["unknown_fields"]

_FIELDS_FILE = Path(__file__).with_name("nomad_api_fields.json")
_CONTAINER = re.compile(r"(\[\]|map\[string\])(\w+)")


@cache
def _structs() -> dict[str, dict[str, str]]:
    structs: dict[str, dict[str, str]] = json.loads(_FIELDS_FILE.read_text(encoding="utf-8"))["structs"]
    return structs


def unknown_fields(job: dict[str, Any], root: str = "Job") -> list[str]:
    """Return the paths (e.g. ``Job.TaskGroups[0].Tasks[0].Resources.MemoryMb``) of keys unknown to Nomad.

    ``root`` names the struct ``job`` is decoded into: ``"Job"`` for a bare job, ``"JobRegisterRequest"`` for
    a ``{"Job": {...}}`` request body. Values of the wrong JSON type are skipped, not reported.
    """
    structs = _structs()
    if root not in structs:
        raise ValueError(f"unknown Nomad API struct {root!r}")
    found: list[str] = []
    _walk(job, root, root, structs, found)
    return found


def _walk(value: Any, kind: str, path: str, structs: dict[str, dict[str, str]], found: list[str]) -> None:
    container = _CONTAINER.fullmatch(kind)
    if container:
        opener, item_kind = container.groups()
        if opener == "[]" and isinstance(value, list):
            for index, item in enumerate(value):
                _walk(item, item_kind, f"{path}[{index}]", structs, found)
        elif opener != "[]" and isinstance(value, dict):
            for key, item in value.items():
                _walk(item, item_kind, f"{path}[{json.dumps(key)}]", structs, found)
        return
    fields = structs.get(kind)  # None for "leaf": free-form, not descended into
    if fields is None or not isinstance(value, dict):
        return
    for key, item in value.items():
        if key not in fields:
            found.append(f"{path}.{key}")
        else:
            _walk(item, fields[key], f"{path}.{key}", structs, found)
