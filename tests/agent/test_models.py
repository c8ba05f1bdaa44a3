"""The model factory and the built-in tools."""

from __future__ import annotations

import pytest
from autogen_core.models import UserMessage
from pydantic import ValidationError

from agent.models import LocalModelAccess, MissingCredentials, check_credentials, create_model_client
from agent.protocol import ModelConfig
from agent.tools import TOOL_NAMES, build_tools, calculator


async def test_replay_plays_back_text_and_tool_calls_and_counts_usage() -> None:
    config = ModelConfig(
        provider="replay", name="s", responses=[{"tool": "calculator", "arguments": {"expression": "1+1"}}, "two"]
    )
    client = create_model_client(config)
    first = await client.create([UserMessage(content="hi", source="user")])
    assert isinstance(first.content, list) and first.content[0].name == "calculator"
    second = await client.create([UserMessage(content="hi", source="user")])
    assert second.content == "two" and second.usage.completion_tokens > 0
    again = create_model_client(config)  # a fresh client per conversation starts from the top
    assert isinstance((await again.create([UserMessage(content="x", source="user")])).content, list)


@pytest.mark.parametrize(
    ("provider", "env"),
    [
        ("openai", "OPENAI_API_KEY"),
        ("openrouter", "OPENROUTER_API_KEY"),
        ("groq", "GROQ_API_KEY"),
        ("deepseek", "DEEPSEEK_API_KEY"),
        ("anthropic", "ANTHROPIC_API_KEY"),
    ],
)
def test_hosted_providers_need_their_key_from_the_environment(
    provider: str, env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(env, raising=False)
    config = ModelConfig(provider=provider, name="some-model")  # type: ignore[arg-type]
    with pytest.raises(MissingCredentials, match=env):
        create_model_client(config)
    with pytest.raises(MissingCredentials, match=env):
        check_credentials(config)  # what the agent checks at its start, without making a client
    monkeypatch.setenv(env, "sk-test")
    check_credentials(config)
    client = create_model_client(config)
    assert client.model_info["function_calling"] is True


def test_providers_without_a_key_of_their_own_need_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    check_credentials(ModelConfig(provider="ollama", name="llama3"))  # the platform's Ollama: a key if it has one
    check_credentials(ModelConfig(provider="ollama", name="llama3", base_url="https://them.example/v1"))
    check_credentials(ModelConfig(provider="replay", name="s", responses=["x"]))


def test_openai_compatible_providers_point_at_their_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROQ_API_KEY", "k")
    groq = create_model_client(ModelConfig(provider="groq", name="llama-3.1-8b-instant"))
    assert "api.groq.com" in str(groq._client.base_url)  # type: ignore[attr-defined]
    ollama = create_model_client(ModelConfig(provider="ollama", name="llama3", base_url="http://127.0.0.1:9999/v1"))
    assert "127.0.0.1:9999" in str(ollama._client.base_url)  # type: ignore[attr-defined]


def test_a_platform_key_is_never_sent_to_a_customers_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_API_KEY", "platform-secret")
    theirs = create_model_client(ModelConfig(provider="ollama", name="llama3", base_url="https://them.example/v1"))
    assert theirs._client.api_key != "platform-secret"  # type: ignore[attr-defined]
    ours = create_model_client(ModelConfig(provider="ollama", name="llama3"))  # the platform's own server
    assert ours._client.api_key == "platform-secret"  # type: ignore[attr-defined]


def test_the_local_provider_is_wired_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARAVAN_LOCAL_MODEL_URL", raising=False)
    config = ModelConfig(provider="local")
    assert config.name == "SmolLM2-135M-Instruct"
    with pytest.raises(MissingCredentials, match="CARAVAN_LOCAL_MODEL_URL"):
        create_model_client(config)
    with pytest.raises(MissingCredentials, match="CARAVAN_LOCAL_MODEL_URL"):
        check_credentials(config)
    monkeypatch.setenv("CARAVAN_LOCAL_MODEL_URL", "http://127.0.0.1:9998/v1")
    check_credentials(config)
    monkeypatch.setenv("CARAVAN_AGENT_ID", "ag-0123456789ab")
    client = create_model_client(config)
    assert "127.0.0.1:9998" in str(client._client.base_url)  # type: ignore[attr-defined]
    assert client._client.default_headers["X-Caravan-Agent"] == "ag-0123456789ab"  # type: ignore[attr-defined]
    assert client.model_info["function_calling"] is True


def test_the_local_provider_is_wired_by_the_caller_when_it_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control plane (a team's selector) passes the address from its settings: its environment is not used."""
    monkeypatch.setenv("CARAVAN_LOCAL_MODEL_URL", "http://127.0.0.1:9998/v1")
    config = ModelConfig(provider="local")
    client = create_model_client(config, LocalModelAccess("http://127.0.0.1:9997/v1", caller="selector-tm-1"))
    assert "127.0.0.1:9997" in str(client._client.base_url)  # type: ignore[attr-defined]
    assert client._client.default_headers["X-Caravan-Agent"] == "selector-tm-1"  # type: ignore[attr-defined]
    with pytest.raises(MissingCredentials, match="CARAVAN_LOCAL_MODEL_URL in the platform's settings"):
        create_model_client(config, LocalModelAccess(None, caller="selector-tm-1"))  # none runs: none from the env
    with pytest.raises(MissingCredentials, match="platform's settings"):
        check_credentials(config, LocalModelAccess(None, caller="selector-tm-1"))


@pytest.mark.parametrize(
    "bad",
    [
        {"provider": "local", "name": "x", "base_url": "http://elsewhere/v1"},
        {"provider": "local", "responses": ["x"]},
        {"provider": "openai", "name": "gpt", "base_url": "http://elsewhere/v1"},
        {"provider": "replay", "name": "x"},
        {"provider": "openai", "name": "gpt", "responses": ["x"]},
        {"provider": "openai", "name": "bad name with spaces"},
        {"provider": "ollama", "name": "m", "base_url": "file:///etc/passwd"},
    ],
)
def test_model_configs_that_make_no_sense_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ModelConfig.model_validate(bad)


async def test_calculator_is_arithmetic_only() -> None:
    assert await calculator("(2 + 3) * 4") == "20"
    assert (await calculator("__import__('os').system('id')")).startswith("error")
    assert (await calculator("9 ** 9999")).startswith("error")
    assert (await calculator("1/0")).startswith("error")
    assert await calculator("(-8) ** (1/3)") == "error: the result is not a real number"  # not a TypeError


def test_tools_are_chosen_from_the_catalog_only() -> None:
    assert [t.name for t in build_tools(list(TOOL_NAMES))] == list(TOOL_NAMES)
    with pytest.raises(ValueError, match="unknown tools"):
        build_tools(["shell"])
