"""The NATS users of ``nomad/nats.nomad.hcl`` as Nomad renders them: its ``nats.conf`` template, with the items of its
Variable, so that tests run the real nats-server with the very configuration an operator deploys."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["NATS_JOB", "render_nats_users"]

NATS_JOB = Path(__file__).parents[2] / "nomad" / "nats.nomad.hcl"
_TEMPLATE = re.compile(
    r'destination\s*=\s*"\$\{NOMAD_SECRETS_DIR\}/nats\.conf".*?data\s*=\s*<<-EOT\n(?P<data>.*?)\n\s*EOT\n', re.DOTALL
)
_ACTION = re.compile(r"\{\{(.*?)\}\}")


def render_nats_users(variable: Mapping[str, str], job: Path = NATS_JOB) -> str:
    """The template's text with ``variable`` (``nomad/jobs/caravan-nats``) in it. It knows the actions the template
    uses (``with nomadVar "<path>"``, ``end``, ``.<item>.Value | toJSON``) and refuses any other, naming it."""
    found = _TEMPLATE.search(job.read_text())
    if found is None:
        raise ValueError(f"{job.name}: no template writing ${{NOMAD_SECRETS_DIR}}/nats.conf")

    def action(match: re.Match[str]) -> str:
        words = match.group(1).strip()
        if words in ('with nomadVar "nomad/jobs/caravan-nats"', "end"):
            return ""
        item = re.fullmatch(r"\.(\w+)\.Value \| toJSON", words)
        if item is None:
            raise ValueError(f"{job.name}: the test renders no {{{{ {words} }}}}")
        return json.dumps(variable[item.group(1)])

    return _ACTION.sub(action, found.group("data"))
