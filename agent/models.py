"""One factory from a :class:`~agent.protocol.ModelConfig` to an AutoGen ``ChatCompletionClient``.

Hosted providers take their API key from the agent's environment (placed there by the scheduler from
secrets, never from the job spec); ``ollama`` at a customer's own ``base_url`` is sent no key, whatever the
environment holds, and its connections are made only to addresses outside the platform's network
(:mod:`agent.egress`). ``local`` is the bundled model behind Caravan's loopback proxy, reached
with the same OpenAI client at ``CARAVAN_LOCAL_MODEL_URL`` (wiring from the job; the control plane, which calls a
team's selector model, passes the address from its settings instead: :class:`LocalModelAccess`). Client libraries are
imported only for the provider in use, which keeps an agent on the offline ``replay`` model light.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autogen_core import CancellationToken, FunctionCall
from autogen_core.models import ChatCompletionClient, CreateResult, ModelFamily, ModelInfo, RequestUsage

from agent.protocol import LOCAL_MODEL_URL_ENV, ModelConfig, ScriptedToolCall, model_key_env, required_model_key

__all__ = [
    "OPENAI_COMPATIBLE",
    "LocalModelAccess",
    "MissingCredentials",
    "ModelClients",
    "check_credentials",
    "create_model_client",
]


class MissingCredentials(RuntimeError):
    """The provider needs an API key that the agent's environment does not have."""


@dataclass(frozen=True)
class LocalModelAccess:
    """Where the ``local`` provider's endpoint is and whom its proxy queues the calls under, for a caller whose
    environment is not an agent's (the control plane: its settings hold the address, which `caravan up` does not
    put in its environment). ``url`` None: the platform runs no local model."""

    url: str | None
    caller: str


OPENAI_COMPATIBLE: dict[str, str | None] = {
    # provider: default base URL (None: the client's own)
    "openai": None,
    "openrouter": "https://openrouter.ai/api/v1",
    "groq": "https://api.groq.com/openai/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "ollama": "http://127.0.0.1:11434/v1",
}

_GENERIC_INFO = ModelInfo(
    vision=False, function_calling=True, json_output=True, family=ModelFamily.UNKNOWN, structured_output=False
)
_LOCAL_INFO = ModelInfo(
    vision=False,
    function_calling=True,
    json_output=True,
    family=ModelFamily.UNKNOWN,
    structured_output=False,
    multiple_system_messages=False,
)


def _key(config: ModelConfig) -> str | None:
    """The platform's key for ``config`` from the environment; :class:`MissingCredentials` when it needs one
    (:func:`~agent.protocol.required_model_key`) that is not there."""
    env_name = model_key_env(config)
    value = os.environ.get(env_name) if env_name else None
    if not value and required_model_key(config) is not None:
        raise MissingCredentials(f"provider {config.provider!r} needs {env_name} in the agent's environment")
    return value


def check_credentials(config: ModelConfig, local: LocalModelAccess | None = None) -> None:
    """Raise :class:`MissingCredentials` if the environment lacks what a client of ``config`` needs (its provider's
    key, the local model's address): what :func:`create_model_client` would raise, without making a client."""
    if config.provider == "local":
        _local_access(local)
    else:
        _key(config)


def create_model_client(config: ModelConfig, local: LocalModelAccess | None = None) -> ChatCompletionClient:
    """Build a fresh client for one conversation; raises :class:`MissingCredentials` if a key is missing.
    ``local``: where the ``local`` provider is (default: ``CARAVAN_LOCAL_MODEL_URL`` and ``CARAVAN_AGENT_ID`` in
    the environment, as an agent has them)."""
    if config.provider == "replay":
        return _replay_client(config)
    if config.provider == "anthropic":
        from autogen_ext.models.anthropic import AnthropicChatCompletionClient

        kwargs: dict[str, Any] = {"model": config.name, "api_key": _key(config)}
        if not config.name.startswith("claude"):
            kwargs["model_info"] = _GENERIC_INFO
        return AnthropicChatCompletionClient(**kwargs, **_sampling(config))

    from autogen_ext.models.openai import OpenAIChatCompletionClient

    if config.provider == "local":
        return OpenAIChatCompletionClient(**_local_kwargs(config, local), **_sampling(config))
    base_url = config.base_url or OPENAI_COMPATIBLE[config.provider]
    kwargs = {"model": config.name, "api_key": _key(config) or "none"}
    if base_url is not None:
        kwargs["base_url"] = base_url
        kwargs["model_info"] = _GENERIC_INFO
    if config.base_url is not None:  # the customer's own endpoint: never one inside the platform's network
        import httpx

        from agent.egress import EgressPolicy, GuardedTransport

        guarded = GuardedTransport(EgressPolicy.from_env())
        kwargs["http_client"] = httpx.AsyncClient(transport=guarded, follow_redirects=True)  # as the SDK's own
    try:
        return OpenAIChatCompletionClient(**kwargs, **_sampling(config))
    except ValueError:  # a model AutoGen has no capability table for (a newer one): assume the common ones
        return OpenAIChatCompletionClient(**kwargs, model_info=_GENERIC_INFO, **_sampling(config))


class ModelClients:
    """The model clients of one agent's conversations, its tasks' and its team runs' alike. Hosted and local models
    share one client: it keeps no conversation state, and a fresh one would cost a task or a run ~20 ms of CPU
    (its HTTP client's TLS context) and, to a hosted provider, a new connection with its TLS handshake. The
    scripted model plays from its first answer in every conversation, so each gets a fresh one."""

    def __init__(self, config: ModelConfig, local: LocalModelAccess | None = None) -> None:
        """``local``: as :func:`create_model_client` takes it."""
        self._config = config
        self._local = local
        self._shared: ChatCompletionClient | None = None

    def get(self) -> ChatCompletionClient:
        """The client for a new conversation; give it back with :meth:`release` when the conversation ends."""
        if self._config.provider == "replay":
            return create_model_client(self._config, self._local)
        if self._shared is None:
            self._shared = create_model_client(self._config, self._local)
        return self._shared

    async def release(self, client: ChatCompletionClient) -> None:
        """A conversation ended: its own client is closed, the shared one stays for the next."""
        if client is not self._shared:
            await client.close()

    async def close(self) -> None:
        """After the conversations: one still ending must not meet a closed client."""
        shared, self._shared = self._shared, None
        if shared is not None:
            await shared.close()


def _local_access(given: LocalModelAccess | None) -> LocalModelAccess:
    local = given or LocalModelAccess(
        os.environ.get(LOCAL_MODEL_URL_ENV), os.environ.get("CARAVAN_AGENT_ID", "unknown")
    )
    if not local.url:
        where = "the platform's settings" if given else "the agent's environment"
        raise MissingCredentials(
            f"provider 'local' needs {LOCAL_MODEL_URL_ENV} in {where} "
            "(Caravan sets it when it runs the local model: `caravan up`)"
        )
    return local


def _local_kwargs(config: ModelConfig, given: LocalModelAccess | None) -> dict[str, Any]:
    """The bundled model behind Caravan's loopback proxy, which queues callers fairly by the header it is sent."""
    local = _local_access(given)
    return {
        "model": config.name,
        "base_url": local.url,
        "api_key": "local",
        "model_info": _LOCAL_INFO,
        "default_headers": {"X-Caravan-Agent": local.caller},
    }


def _sampling(config: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if config.stream:  # every call is a stream then (AgentChat's streaming mode); ask for the token counts too
        out["stream_options"] = {"include_usage": True}
    if config.temperature is not None:
        out["temperature"] = config.temperature
    if config.max_tokens is not None:
        out["max_tokens"] = config.max_tokens
    return out


def _replay_client(config: ModelConfig) -> ChatCompletionClient:
    from autogen_ext.models.replay import ReplayChatCompletionClient

    class _Scripted(ReplayChatCompletionClient):
        """The replay client, plus a cancellable per-answer delay (a slow model for demos and tests)."""

        async def create(
            self, messages: Sequence[Any], *, cancellation_token: CancellationToken | None = None, **kwargs: Any
        ) -> CreateResult:
            if config.delay_ms:
                sleeper = asyncio.ensure_future(asyncio.sleep(config.delay_ms / 1000))
                if cancellation_token is not None:
                    cancellation_token.link_future(sleeper)
                await sleeper
            return await super().create(messages, cancellation_token=cancellation_token, **kwargs)

        @property
        def position(self) -> int:
            """How many scripted answers were given: part of a team's checkpoint, so a resumed run goes on."""
            return self._current_index

        def seek(self, position: int) -> None:
            self._current_index = max(0, min(position, len(self.chat_completions)))

    script: list[str | CreateResult] = [
        item if isinstance(item, str) else _tool_call_result(item) for item in config.responses
    ]
    info = ModelInfo(
        vision=False, function_calling=True, json_output=False, family=ModelFamily.UNKNOWN, structured_output=False
    )
    return _Scripted(script, model_info=info)


def _tool_call_result(call: ScriptedToolCall) -> CreateResult:
    arguments = json.dumps(call.arguments)
    return CreateResult(
        finish_reason="function_calls",
        content=[FunctionCall(id=f"call_{uuid.uuid4().hex[:12]}", name=call.tool, arguments=arguments)],
        usage=RequestUsage(prompt_tokens=0, completion_tokens=max(1, len(arguments) // 4)),
        cached=False,
    )
