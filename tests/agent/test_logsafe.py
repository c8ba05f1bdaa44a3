"""The secrets a Caravan process was given never reach a line of its log: the control plane's (``caravan up`` and
``caravan serve``: its admin key, JWT secret, NATS password, Nomad and Consul tokens, model providers' keys, besides
the tokens and API keys the gateway's filter finds by their shape) and an agent's (its NATS password, its model's
key), whichever logger writes the line, in its message, its arguments or its traceback. Nor does a customer's
content, which AutoGen's event loggers write whole at INFO (a model call's prompt and answer), unless the operator
asks for debug."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import pytest
from autogen_core import EVENT_LOGGER_NAME
from autogen_core.logging import LLMCallEvent

from agent import __main__ as agent_main
from agent.logsafe import (
    CONTENT_LOGGERS,
    REDACTED,
    Redacting,
    hide_in_logs,
    install_on_handlers,
    printable,
    secrets_in_env,
)
from control.cli import configure_logging
from control.settings import Settings

SECRETS = {
    "CARAVAN_ADMIN_KEY": "operator-chosen-admin-key",
    "CARAVAN_JWT_SECRET": "jwt-signing-secret-0f9e",
    "CARAVAN_NATS_PASSWORD": "nats-password-5b2c",
    "CARAVAN_NATS_CALLOUT_SEED": "SAAD3Z5Q7UGGYCVBBXXJKXQDNFQVGPHXG3QVXXJQ6GGQ2ACQ3N3ZSGKYJA",
    "CARAVAN_NOMAD_TOKEN": "6f1d2c3b-nomad-acl-token",  # (settings only: NOMAD_TOKEN is an agent's secret too)
    "CARAVAN_NOMAD_NAMESPACE_TOKEN": "2e4f-nomad-management-token",
    "CONSUL_HTTP_TOKEN": "9a8b7c6d-consul-acl-token",
    "OPENAI_API_KEY": "sk-proj-provider-key-31415",
}
GENERATED_KEY = "cvn_0123abcd_" + "k" * 32
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjdS0xIn0.c2lnbmF0dXJl"


@pytest.fixture(autouse=True)
def levels_kept() -> Iterator[None]:
    """The levels that configuring a process's logging sets, as they were (other tests log through them)."""
    loggers = [logging.getLogger(name) for name in (*CONTENT_LOGGERS, "httpx")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@contextlib.contextmanager
def root_lines() -> Iterator[io.StringIO]:
    """What a handler on the root logger writes while inside, with the root at DEBUG (each logger's own level
    decides: under pytest ``logging.basicConfig`` sets none), the filters put on the root's handlers taken off
    after."""
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level, root.level = root.level, logging.DEBUG
    try:
        yield lines
    finally:
        root.setLevel(level)
        root.removeHandler(handler)
        for other in root.handlers:
            for redacting in [f for f in other.filters if isinstance(f, Redacting)]:
                other.removeFilter(redacting)


def log_everywhere(secrets: list[str]) -> int:
    """Each secret quoted as a line may quote it: as an argument, in the message, inside a dict, in a traceback;
    how many quotes there were."""
    first, *rest = secrets
    logging.getLogger("caravan.tasks").error("the model refused key %s", first)
    logging.getLogger("nats").error(f"could not connect with {rest}")
    logging.getLogger("caravan.scheduler.nomad").error("Nomad answered %s", {"headers": {"X-Nomad-Token": rest[0]}})
    try:
        raise RuntimeError(f"unexpected: {' '.join(secrets)}")
    except RuntimeError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    return 1 + len(rest) + 1 + len(secrets)


def test_the_control_planes_lines_quote_none_of_its_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    with root_lines() as lines:
        configure_logging(Settings())
        quoted = log_everywhere([*SECRETS.values(), GENERATED_KEY, JWT])
    written = lines.getvalue()
    for secret in [*SECRETS.values(), GENERATED_KEY, JWT]:
        assert secret not in written
    assert "cvn_0123abcd_<redacted>" in written  # a generated key keeps its prefix, as the audit log shows it
    assert written.count(REDACTED) == quoted
    assert "Traceback" in written and "the model refused key" in written and "Nomad answered" in written


def test_an_agents_lines_quote_neither_its_nats_password_nor_its_models_key() -> None:
    env = {"CARAVAN_NATS_PASSWORD": "agent-nats-password-1", "OPENAI_API_KEY": "sk-agent-model-key-2", "HOME": "/h"}
    secrets = secrets_in_env(env)
    assert sorted(secrets) == sorted([env["CARAVAN_NATS_PASSWORD"], env["OPENAI_API_KEY"]])
    with root_lines() as lines:
        install_on_handlers(Redacting(secrets))
        quoted = log_everywhere(secrets)
    written = lines.getvalue()
    assert not any(secret in written for secret in secrets)
    assert "Traceback" in written and written.count(REDACTED) == quoted


def test_a_secret_made_after_logging_was_set_up_is_hidden_from_then_on() -> None:
    """``caravan up`` derives its NATS password (the embedded server's, shown in its banner) after its logging is
    configured: :func:`hide_in_logs` adds it to the filters already on the handlers."""
    made_later = "c0ffee" * 11
    with root_lines() as lines:
        configure_logging(Settings())
        logging.getLogger("nats").error("before: %s", made_later)
        hide_in_logs(made_later, None)
        quoted = log_everywhere([made_later, f"nats://caravan-control:{made_later}@127.0.0.1:4222"])
    written = lines.getvalue()
    assert written.count(made_later) == 1 and f"before: {made_later}" in written  # hidden from then on
    assert written.count(REDACTED) == quoted


def test_a_secret_inside_another_is_hidden_whole_and_short_values_are_not_looked_for() -> None:
    redacting = Redacting(["abcdefgh", "xxabcdefghyy", "short", None, ""])
    assert redacting.redact("a xxabcdefghyy b abcdefgh c short") == f"a {REDACTED} b {REDACTED} c short"
    assert Redacting([]).redact("nothing to hide") == "nothing to hide"


CONTENT = "the customer's plan for Q3"


def log_content() -> None:
    """What AutoGen logs of a model call (its ``LLMCallEvent``, as its OpenAI client writes it: the prompt and the
    answer) and of a team."""
    call = LLMCallEvent(
        messages=[{"role": "user", "content": CONTENT}],
        response={"choices": [{"message": {"content": f"about {CONTENT}"}}]},
        prompt_tokens=7,
        completion_tokens=3,
    )
    logging.getLogger(EVENT_LOGGER_NAME).info(call)
    logging.getLogger("autogen_agentchat.events").info("a team's message: %s", CONTENT)


@pytest.mark.parametrize(("level", "written"), [("info", 0), ("warning", 0), ("debug", 3)])
def test_the_control_plane_logs_no_model_call_whole_but_at_debug(
    monkeypatch: pytest.MonkeyPatch, level: str, written: int
) -> None:
    monkeypatch.setenv("CARAVAN_LOG_LEVEL", level)
    with root_lines() as lines:
        configure_logging(Settings())
        log_content()
    assert lines.getvalue().count(CONTENT) == written


def test_an_agent_logs_no_model_call_whole() -> None:
    with root_lines() as lines:
        agent_main.configure_logging()
        log_content()
        logging.getLogger("caravan.agent").info("its own lines still are")
    assert CONTENT not in lines.getvalue() and "its own lines still are" in lines.getvalue()


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain café ✓ 日本", "plain café ✓ 日本"),
        ("\x1b[31mred\x00", "\\x1b[31mred\\x00"),
        ("two\nlines\r", "two\\nlines\\r"),
        ("\u202eevil\u200b", "\\u202eevil\\u200b"),
    ],
)
def test_printable_keeps_a_line_one_line_that_shows_every_character(text: str, shown: str) -> None:
    assert printable(text) == shown
