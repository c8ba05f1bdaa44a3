"""A customer's model endpoint never points into the platform's network: refused as written when an agent is
defined, and refused by the agent's HTTP client at every connection, after it resolves the name itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from autogen_core.models import UserMessage

from agent.egress import (
    ALLOW_ENV,
    FAILURE_TEXT_MAX,
    EgressPolicy,
    EgressRefused,
    GuardedTransport,
    endpoint_failure,
    failure_text,
    refusal_in,
)
from agent.models import create_model_client
from agent.protocol import ModelConfig
from tests.support.helpers import chat_completion, free_port

INTERNAL = [
    "http://127.0.0.1:11434/v1",
    "http://127.1/v1",  # what a resolver reads as 127.0.0.1
    "http://2130706433/v1",  # 127.0.0.1 as one number
    "http://0x7f.1/v1",
    "http://[::1]:8080/v1",
    "http://[::ffff:127.0.0.1]/v1",  # an IPv4-mapped loopback
    "http://[::127.0.0.1]:11434/v1",  # an IPv4-compatible one
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # the metadata service through a NAT64 gateway
    "http://[64:ff9b::10.0.0.5]/v1",
    "http://[64:ff9b:1::a00:1]/v1",  # a NAT64 prefix for a network's own use
    "http://[2002:a9fe:a9fe::]/v1",  # 6to4 of 169.254.169.254
    "http://[::a9fe:a9fe]/v1",
    "http://169.254.169.254/latest/meta-data/",  # a cloud's instance metadata
    "http://10.0.0.5:4646/v1",  # where a Nomad server may listen
    "http://192.168.1.10/v1",
    "http://0.0.0.0:8080/v1",
    "http://localhost:8080/v1",
    "http://LOCALHOST./v1",
    "http://api.localhost/v1",
]


@pytest.mark.parametrize("url", INTERNAL)
def test_an_internal_host_as_written_is_refused(url: str) -> None:
    with pytest.raises(EgressRefused, match=ALLOW_ENV):
        EgressPolicy().check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://models.example.com/v1",
        "http://8.8.8.8/v1",
        "http://[2606:4700::1111]/v1",
        "http://[64:ff9b::8.8.8.8]/v1",  # NAT64 of a public address
        "http://[2002:808:808::1]/v1",  # 6to4 of one
    ],
)
def test_a_public_host_is_allowed(url: str) -> None:
    EgressPolicy().check_url(url)


@pytest.mark.parametrize(
    "url",
    ["http://b\u00fccher.example/v1", "http://ollama_server:11434/v1", "http://xn--bcher-kva.example./v1"],
)
def test_a_host_name_in_another_script_or_with_underscores_is_a_model_endpoint(url: str) -> None:
    ModelConfig(provider="ollama", name="m", base_url=url)
    EgressPolicy().check_url(url)


def test_an_operator_allows_internal_hosts_and_networks_by_name() -> None:
    policy = EgressPolicy.parse(" ollama.internal , 10.20.0.0/16,127.0.0.1, gpu.internal. ")
    allowed = (
        "http://ollama.internal:11434/v1",
        "http://10.20.3.4/v1",
        "http://127.0.0.1/v1",
        "http://gpu.internal/v1",
    )
    for url in (*allowed, "http://[::ffff:10.20.3.4]/v1", "http://[64:ff9b::10.20.3.4]/v1"):  # (the IPv4 it carries)
        policy.check_url(url)
    with pytest.raises(EgressRefused):
        policy.check_url("http://10.21.0.1/v1")
    with pytest.raises(ValueError, match="neither a host name nor a network"):
        EgressPolicy.parse("10.0.0.0/8, not a host!")


@contextlib.asynccontextmanager
async def answering(status: bytes, body: bytes) -> AsyncIterator[int]:
    """A plain HTTP server on loopback that answers every request with ``status`` and a JSON ``body``; its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length")), 0)
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n" % status)
        writer.write(b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@pytest.fixture
async def http_server() -> AsyncIterator[int]:
    """:func:`answering` every request with an OpenAI chat completion."""
    async with answering(b"200 OK", chat_completion("from loopback")) as port:
        yield port


async def test_the_transport_checks_the_address_a_name_resolves_to_and_connects_to_it(http_server: int) -> None:
    async with httpx.AsyncClient(transport=GuardedTransport(EgressPolicy())) as client:
        for host in ("localhost", "127.0.0.1"):  # a name is resolved by the transport, and checked
            with pytest.raises(EgressRefused, match=r"127\.0\.0\.1|::1"):  # (a hosts file may give ::1 as well)
                await client.get(f"http://{host}:{http_server}/")
    async with httpx.AsyncClient(transport=GuardedTransport(EgressPolicy.parse("127.0.0.0/8,::1"))) as client:
        assert (await client.get(f"http://localhost:{http_server}/")).status_code == 200


async def test_each_checked_address_is_tried_in_turn(http_server: int) -> None:
    """A name's first address may not answer (an IPv6 one, say): the next one checked is tried, as a connection to
    the name would."""

    class TwoAddresses(EgressPolicy):
        async def resolve(self, host: str, port: int) -> list[str]:
            return ["127.0.0.2", "127.0.0.1"]  # nothing listens on the first

    async with httpx.AsyncClient(transport=GuardedTransport(TwoAddresses())) as client:
        assert (await client.get(f"http://model.example:{http_server}/")).status_code == 200


async def test_an_ollama_model_client_at_an_internal_address_says_why_it_failed(
    http_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    config = ModelConfig(provider="ollama", name="m", base_url=f"http://localhost:{http_server}/v1")
    with pytest.raises(Exception) as failed:  # the client wraps it: "Connection error."
        await create_model_client(config).create([UserMessage(content="hi", source="user")])
    refused = refusal_in(failed.value)
    assert refused is not None and re.search(r"resolves to (127\.0\.0\.1|::1)", str(refused))
    monkeypatch.setenv(ALLOW_ENV, "127.0.0.1/32,::1")  # the operator's own model server on this machine
    answer = await create_model_client(config).create([UserMessage(content="hi", source="user")])
    assert answer.content == "from loopback"


async def failed_call(config: ModelConfig) -> BaseException:
    with pytest.raises(Exception) as failed:
        await create_model_client(config).create([UserMessage(content="hi", source="user")])
    return failed.value


async def test_a_model_call_that_fails_names_the_endpoint_it_called(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task's reason says which endpoint failed and how, where the SDK says only "Connection error." (a name
    that did not resolve came out as a bare ``gaierror: [Errno -2] Name or service not known``)."""
    monkeypatch.setenv(ALLOW_ENV, "127.0.0.1/32")
    port = free_port()  # nothing listens there
    closed = await failed_call(ModelConfig(provider="ollama", name="m", base_url=f"http://127.0.0.1:{port}/v1"))
    said = endpoint_failure(closed)
    assert said is not None and said.startswith(f"cannot reach the model endpoint (POST http://127.0.0.1:{port}/v1/")
    nowhere = await failed_call(ModelConfig(provider="ollama", name="m", base_url="http://models.invalid/v1"))
    said = endpoint_failure(nowhere)
    assert (
        said is not None and "(POST http://models.invalid/v1/chat/completions): cannot look up models.invalid" in said
    )
    error = json.dumps({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
    async with answering(b"401 Unauthorized", error.encode()) as port:
        refused = await failed_call(ModelConfig(provider="ollama", name="m", base_url=f"http://127.0.0.1:{port}/v1"))
    said = endpoint_failure(refused)
    assert said is not None and said.startswith(
        f"the model endpoint (POST http://127.0.0.1:{port}/v1/chat/completions)"
    )
    assert "401" in said and "Incorrect API key provided" in said
    assert endpoint_failure(ValueError("not a model call")) is None


def test_the_endpoint_named_carries_no_credentials_or_query() -> None:
    request = httpx.Request("POST", "https://user:secret@models.example:8443/v1/chat/completions?key=secret")
    said = endpoint_failure(httpx.ConnectError("connection refused", request=request))
    assert said == (
        "cannot reach the model endpoint (POST https://models.example:8443/v1/chat/completions): connection refused"
    )


async def test_what_a_failed_task_says_is_bounded_and_carries_no_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task's status reason and error event: an endpoint that answers a whole page of error is cut to
    FAILURE_TEXT_MAX characters (it was stored and streamed whole), and an error carrying a member's traceback
    (AgentChat's) says only what comes before it."""
    monkeypatch.setenv(ALLOW_ENV, "127.0.0.1/32")
    page = json.dumps({"error": {"message": "overloaded " + "x" * 20_000, "type": "server_error"}})
    async with answering(b"400 Bad Request", page.encode()) as port:
        refused = await failed_call(ModelConfig(provider="ollama", name="m", base_url=f"http://127.0.0.1:{port}/v1"))
    said = failure_text(refused)
    assert len(said) == FAILURE_TEXT_MAX and said.startswith(f"the model endpoint (POST http://127.0.0.1:{port}/")
    assert "overloaded xxx" in said
    member = RuntimeError("ValueError: no such tool\nTraceback (most recent call last):\n  File ...\nValueError")
    assert failure_text(member) == "RuntimeError: ValueError: no such tool"
    assert failure_text(RuntimeError()) == "RuntimeError"
    assert failure_text(ValueError("bad " * 1000)) == f"ValueError: {('bad ' * 1000)[: FAILURE_TEXT_MAX - 12]}"
