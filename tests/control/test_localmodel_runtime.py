"""The local model server as a supervised child process, its answers through the proxy, and how `caravan up` picks
the demo's model."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest

from control.cli import _demo_model
from control.localmodel import (
    LlamaServer,
    LocalModel,
    LocalModelUnavailable,
    bundled_model_path,
    runtime_installed,
)
from tests.conftest import make_settings
from tests.support.helpers import assert_eventually, now


async def _answers(server: LlamaServer) -> int | None:
    """The server's pid, once it is ready (its supervisor too says so) and answers."""
    if not server.ready:
        return None
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            if (await client.get(f"{server.base_url}/v1/models")).status_code == 200:
                return server.pid
    except (httpx.HTTPError, AttributeError):  # (httpcore reads a socket the server closed as it connected: None)
        pass
    return None


@pytest.mark.skipif(os.environ.get("CARAVAN_LOCAL_MODEL") == "0", reason="CARAVAN_LOCAL_MODEL=0")
async def test_a_server_that_dies_is_started_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert runtime_installed(), "the local model is not installed: ./dev/test installs it"
    async with LlamaServer(bundled_model_path(), tmp_path / "server.log", threads=1, restart_delay=0.1) as server:
        first = server.pid
        assert first is not None and await _answers(server) == first
        os.killpg(first, signal.SIGKILL)
        await assert_eventually(
            lambda: _answers(server), lambda pid: pid is not None and pid != first, within=60, what="restarted"
        )
        assert server.restarts == 1
        second = server.pid
        assert second is not None
        os.killpg(second, signal.SIGINT)  # stopped from outside: it exits cleanly, and is started again too
        await assert_eventually(
            lambda: _answers(server), lambda pid: pid is not None and pid != second, within=60, what="restarted"
        )
        assert server.restarts == 2
    assert server.pid is None
    # an operator reads how it ended: a crash is an error, a clean exit only a warning
    how = re.compile(r"the local model server (exited|killed) [^:]*")
    ended = sorted((r.levelname, m[0]) for r in caplog.records if (m := how.match(r.getMessage())))
    assert ended == [
        ("ERROR", "the local model server killed by SIGKILL"),
        ("WARNING", "the local model server exited with code 0"),
    ], caplog.text


@pytest.mark.skipif(os.environ.get("CARAVAN_LOCAL_MODEL") == "0", reason="CARAVAN_LOCAL_MODEL=0")
async def test_a_restart_that_fails_is_reported_once_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with LlamaServer(bundled_model_path(), tmp_path / "server.log", threads=1, restart_delay=0.1) as server:
        first = server.pid
        assert first is not None
        command = server._command
        monkeypatch.setattr(server, "_command", lambda: [sys.executable, "-c", "raise SystemExit(3)"])
        os.killpg(first, signal.SIGKILL)
        failed = re.compile(r"the local model server exited with code 3")
        await assert_eventually(
            now(lambda: sum(1 for r in caplog.records if failed.match(r.getMessage()))), lambda n: n >= 2
        )
        monkeypatch.setattr(server, "_command", command)
        await assert_eventually(lambda: _answers(server), lambda pid: pid is not None, within=60, what="restarted")
        failures = sum(1 for r in caplog.records if failed.match(r.getMessage()))
        assert server.restarts == failures + 1  # each failed launch counted once, then the one that came up
    ended = re.compile(r"the local model server (exited|killed)")
    ends = [r.getMessage() for r in caplog.records if ended.match(r.getMessage())]
    assert len(ends) == failures + 1 and "killed by SIGKILL" in ends[0], ends  # no exit reported twice


async def test_a_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LocalModelUnavailable, match="model file not found"):
        async with LlamaServer(tmp_path / "none.gguf", tmp_path / "server.log"):
            pass


def test_the_demo_runs_on_a_hosted_model_if_a_key_is_set_else_locally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for env in ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "GROQ_API_KEY", "DEEPSEEK_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(env, raising=False)
    settings = make_settings("nats://127.0.0.1:1", tmp_path)
    assert _demo_model(settings).model.provider == "replay"
    local = _demo_model(settings.model_copy(update={"local_model_url": "http://127.0.0.1:5/v1"}))
    assert local.model.provider == "local" and local.model.stream and "no provider key" in local.about
    monkeypatch.setenv("GROQ_API_KEY", "k")
    hosted = _demo_model(settings.model_copy(update={"local_model_url": "http://127.0.0.1:5/v1"}))
    assert hosted.model.provider == "groq" and "GROQ_API_KEY" in hosted.about


ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Adds two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
    },
}


async def test_the_proxy_answers_as_the_server_does_though_it_asks_for_a_stream(local_model: LocalModel) -> None:
    """The proxy asks the server for every answer streamed; one not streamed is the same answer, with the same
    usage (quotas count it), and a request the server fails gets the server's error (not a stream broken off)."""
    assert local_model.server is not None
    calls = [
        {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0},
        {
            "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
            "tools": [ADD],
            "tool_choice": {"type": "function", "function": {"name": "add"}},
            "temperature": 0,
        },
        {
            "messages": [{"role": "user", "content": "Add."}],
            "tools": [ADD],
            "tool_choice": {"type": "function", "function": {"name": "sub"}},
        },
        {"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 8},
    ]
    failed = []
    async with httpx.AsyncClient(timeout=60) as client:
        for body in calls:
            direct = await client.post(f"{local_model.server.base_url}/v1/chat/completions", json=body)
            failed.append(direct.status_code != 200)
            proxied = await client.post(f"{local_model.url}/chat/completions", json=body)
            assert proxied.status_code == direct.status_code, proxied.text
            if direct.status_code != 200:
                assert proxied.json() == direct.json() and proxied.headers["x-should-retry"] == "false"
                continue
            mine, theirs = proxied.json(), direct.json()
            assert mine["usage"] == theirs["usage"], body
            assert mine["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"]
            message, expected = mine["choices"][0]["message"], theirs["choices"][0]["message"]
            assert message["content"] == expected["content"]
            assert [c["function"] for c in message.get("tool_calls") or []] == [
                c["function"] for c in expected.get("tool_calls") or []
            ]
    assert failed == [False, False, True, True]  # a tool not offered, a prompt over the context: the server's errors
