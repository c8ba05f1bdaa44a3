"""Render a job template: ``[[ name ]]`` placeholders become JSON literals of typed variables.

Placeholders stand where a whole JSON value stands, so a value can never change the structure of the
job; Nomad's ``${...}`` interpolation and consul-template's ``{{ }}`` pass through untouched.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import Any

from pydantic import BaseModel

__all__ = ["TemplateError", "render", "template_placeholders"]

_PLACEHOLDER = re.compile(r"\[\[\s*([a-z_][a-z0-9_]*)\s*\]\]")


class TemplateError(ValueError):
    """A template and its variables do not fit together."""


@cache
def _template(name: str) -> str:
    return resources.files("jobs").joinpath("templates", f"{name}.json.tmpl").read_text(encoding="utf-8")


def template_placeholders(name: str) -> set[str]:
    return set(_PLACEHOLDER.findall(_template(name)))


def render(name: str, variables: BaseModel) -> dict[str, Any]:
    """Render template ``name`` with ``variables``; returns the Nomad API ``Job`` object."""
    values = variables.model_dump(mode="json")
    missing = template_placeholders(name) - values.keys()
    if missing:
        raise TemplateError(f"template {name!r} uses undefined variables: {', '.join(sorted(missing))}")
    text = _PLACEHOLDER.sub(lambda m: json.dumps(values[m.group(1)]), _template(name))
    try:
        job: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"template {name!r} did not render to JSON: {exc}") from exc
    return job
