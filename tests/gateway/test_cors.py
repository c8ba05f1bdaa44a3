"""CORS (CARAVAN_CORS_ORIGINS): a customer's web app on an allowed origin calls the API from a browser, errors
included; any other origin, and every origin when the setting is empty, gets no CORS headers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import httpx
import pytest
from pydantic import ValidationError

from control.metrics import Metrics
from control.settings import Settings
from gateway.app import MAX_BODY_BYTES, create_app
from tests.conftest import Api, make_settings
from tests.support.helpers import serve_app

ORIGIN = "https://app.example.com"
OTHER = "https://evil.example.com"


def preflight(origin: str, method: str, headers: str | None = None) -> dict[str, str]:
    """What a browser sends before a cross-origin request that is not a simple one."""
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        sent["Access-Control-Request-Headers"] = headers
    return sent


def listed(headers: httpx.Headers, name: str) -> set[str]:
    return {item.strip().lower() for item in headers.get(name, "").split(",") if item.strip()}


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name.lower().startswith("access-control-")}


@pytest.fixture
async def cors(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    """The API, on the control plane of ``api``, with ``ORIGIN`` (as an operator might write it) allowed."""
    settings = make_settings(api.control.settings.nats_url, api.control.settings.data_dir, cors_origins=ORIGIN)
    async with serve_app(create_app(settings, api.control)) as base, httpx.AsyncClient(base_url=base) as client:
        yield client


async def test_a_preflight_from_an_allowed_origin_is_answered_before_authentication(
    cors: httpx.AsyncClient,
) -> None:
    answer = await cors.options("/v1/agents", headers=preflight(ORIGIN, "POST", "authorization, content-type"))
    assert answer.status_code == 200, answer.text
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert {"get", "head", "post", "put", "patch", "delete"} <= listed(answer.headers, "Access-Control-Allow-Methods")
    assert {"authorization", "content-type"} <= listed(answer.headers, "Access-Control-Allow-Headers")
    assert answer.headers["Access-Control-Max-Age"] == "600"
    assert "Access-Control-Allow-Credentials" not in answer.headers  # bearer tokens, not cookies
    assert "origin" in listed(answer.headers, "Vary")
    # a task's event stream resumed by a script with its bearer token; an agent changed or deleted
    events = await cors.options(
        "/v1/tasks/tk-1/events", headers=preflight(ORIGIN, "GET", "Authorization, Last-Event-ID")
    )
    assert events.status_code == 200 and "last-event-id" in listed(events.headers, "Access-Control-Allow-Headers")
    for method in ("PATCH", "DELETE", "HEAD"):
        answer = await cors.options("/v1/agents/ag-1", headers=preflight(ORIGIN, method, "authorization"))
        assert answer.status_code == 200, (method, answer.text)


async def test_a_request_from_an_allowed_origin_is_readable_by_it_and_so_are_its_errors(
    api: Api, cors: httpx.AsyncClient
) -> None:
    _, headers = await api.new_customer()
    mine = {"Origin": ORIGIN, **headers}
    listing = await cors.get("/v1/agents", headers=mine)
    assert listing.status_code == 200, listing.text
    assert listing.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert {"retry-after", "x-request-id"} <= listed(listing.headers, "Access-Control-Expose-Headers")
    assert "origin" in listed(listing.headers, "Vary")  # a cache keeps one answer per origin
    assert "Access-Control-Allow-Credentials" not in listing.headers
    assert (await cors.head("/v1/agents", headers=mine)).headers["Access-Control-Allow-Origin"] == ORIGIN
    errors: list[tuple[int, httpx.Response]] = [
        (401, await cors.post("/v1/agents", json={}, headers={"Origin": ORIGIN})),
        (404, await cors.get("/v1/agents/ag-nosuchagent", headers=mine)),
        (404, await cors.get("/v1/nothing-here", headers=mine)),
        (413, await cors.post("/v1/agents", content=b"x" * (MAX_BODY_BYTES + 1), headers=mine)),
        (415, await cors.post("/v1/agents", content=b"{}", headers={**mine, "Content-Type": "text/plain"})),
        (422, await cors.post("/v1/agents", json={}, headers=mine)),
    ]
    for status, answer in errors:
        assert answer.status_code == status, (status, answer.text)
        assert "error" in answer.json()  # the API's own error, which the page can read
        assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN, status


async def test_a_429_from_an_allowed_origin_tells_the_page_when_to_try_again(api: Api) -> None:
    _, headers = await api.new_customer()
    settings = make_settings(
        api.control.settings.nats_url, api.control.settings.data_dir, cors_origins=ORIGIN, rate_limit_scale=0.05
    )  # standard: 1/s, burst 3
    async with serve_app(create_app(settings, api.control)) as base, httpx.AsyncClient(base_url=base) as client:
        answers = [await client.get("/v1/agents", headers={"Origin": ORIGIN, **headers}) for _ in range(5)]
    limited = answers[-1]
    assert limited.status_code == 429, limited.text
    assert limited.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert int(limited.headers["Retry-After"]) >= 1
    assert "retry-after" in listed(limited.headers, "Access-Control-Expose-Headers")


async def test_another_origin_is_refused_its_preflight_and_gets_no_allow_origin(
    api: Api, cors: httpx.AsyncClient
) -> None:
    refused = await cors.options("/v1/agents", headers=preflight(OTHER, "POST", "authorization, content-type"))
    assert refused.status_code == 400
    assert "Access-Control-Allow-Origin" not in refused.headers
    _, headers = await api.new_customer()
    answer = await cors.get("/v1/agents", headers={"Origin": OTHER, **headers})
    assert answer.status_code == 200  # the browser, not the API, keeps the answer from the page
    assert not cors_headers(answer) and "origin" in listed(answer.headers, "Vary")
    for origin in (f"{ORIGIN}:8443", ORIGIN.replace("https", "http"), f"{ORIGIN}.evil.example", "null"):
        answer = await cors.get("/v1/agents", headers={"Origin": origin, **headers})
        assert not cors_headers(answer), origin
    # a header the API does not read is not allowed either, even from the allowed origin
    header = await cors.options("/v1/agents", headers=preflight(ORIGIN, "POST", "authorization, x-custom"))
    assert header.status_code == 400


async def test_an_error_outside_the_apps_handlers_is_still_the_apis_500_and_readable_by_the_page(
    api: Api, cors: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault in a middleware around the app's error handling (here, counting the request for the metrics) gets
    Starlette's last-resort 500, sent around the CORS middleware: it is the API's error all the same, with the CORS
    headers of the other answers, so that a page on an allowed origin reads it (and its request id), and no other
    origin gets them."""

    def failing(*_: object) -> None:
        raise RuntimeError("the metrics failed")

    monkeypatch.setattr(Metrics, "request", failing)
    for client, origin, readable in ((cors, ORIGIN, True), (cors, OTHER, False), (api.client, ORIGIN, False)):
        answer = await client.get("/healthz", headers={"Origin": origin})
        assert answer.status_code == 500, answer.text
        error = answer.json()["error"]
        assert error["code"] == "internal" and answer.headers["X-Request-ID"] == error["details"]["request_id"]
        if readable:
            assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert "x-request-id" in listed(answer.headers, "Access-Control-Expose-Headers")
            assert "origin" in listed(answer.headers, "Vary")
        else:
            assert not cors_headers(answer), (origin, answer.headers)


REFUSED: list[tuple[dict[str, str], dict[str, object], list[str]]] = [
    (preflight(OTHER, "POST", "authorization, content-type"), {"origin": OTHER}, [f"origin {OTHER}"]),
    (preflight(ORIGIN, "TRACE"), {"method": "TRACE"}, ["method TRACE", "GET, HEAD, POST, PUT, PATCH, DELETE"]),
    (preflight(ORIGIN, "POST", "Authorization, X-Custom"), {"headers": ["x-custom"]}, ["x-custom", "authorization"]),
    (
        {**preflight(ORIGIN, "GET"), "Access-Control-Request-Private-Network": "true"},
        {"private_network": True},
        ["private network"],
    ),
    (preflight(OTHER, "PUT", "x-custom"), {"origin": OTHER, "headers": ["x-custom"]}, [OTHER, "x-custom"]),
]
"""Preflights refused: what each asks, what the error's details say was refused, what its message names."""


@pytest.mark.parametrize(("sent", "details", "named"), REFUSED, ids=["origin", "method", "header", "private", "two"])
async def test_a_refused_preflight_is_the_apis_error_naming_what_was_refused_and_allows_nothing(
    cors: httpx.AsyncClient, sent: dict[str, str], details: dict[str, object], named: list[str]
) -> None:
    refused = await cors.options("/v1/agents", headers=sent)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["code"], error["details"]) == ("cors_refused", details)
    assert error["message"].startswith("CORS preflight refused: ")
    assert all(name in error["message"] for name in named), error["message"]
    assert not [name for name in cors_headers(refused) if name.lower().startswith("access-control-allow-")]
    assert "origin" in listed(refused.headers, "Vary")


async def test_without_the_setting_there_are_no_cors_headers(api: Api) -> None:
    _, headers = await api.new_customer()
    answer = await api.client.options("/v1/agents", headers=preflight(ORIGIN, "POST", "authorization, content-type"))
    assert answer.status_code == 405 and not cors_headers(answer)
    for sent in ({"Origin": ORIGIN, **headers}, {"Origin": ORIGIN}):
        answer = await api.client.get("/v1/agents", headers=sent)
        assert answer.status_code in (200, 401) and not cors_headers(answer), answer.headers


def test_the_origins_are_read_from_the_environment_as_a_browser_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARAVAN_CORS_ORIGINS", raising=False)
    assert Settings().cors_origins == ()
    monkeypatch.setenv("CARAVAN_CORS_ORIGINS", "")
    assert Settings().cors_origins == ()
    monkeypatch.setenv(
        "CARAVAN_CORS_ORIGINS", " HTTPS://App.Example.com:443, http://localhost:3000,,https://app.example.com,"
    )
    assert Settings().cors_origins == ("https://app.example.com", "http://localhost:3000")
    monkeypatch.setenv("CARAVAN_CORS_ORIGINS", "http://127.0.0.1:80,http://[::1]:8080")
    assert Settings().cors_origins == ("http://127.0.0.1", "http://[::1]:8080")


BAD: Mapping[str, str] = {
    "*": "wildcards are not allowed, name each origin that may call the API",
    "https://*.example.com": "wildcards are not allowed, name each origin that may call the API",
    "https://app.example.com/": "it has a path (a trailing slash is one: leave it out)",
    "https://app.example.com/app": "it has a path",
    "https://app.example.com?x=1": "it has a query",
    "https://app.example.com#top": "it has a fragment",
    "https://user:secret@app.example.com": "it has a user name or password",
    "ftp://app.example.com": "the scheme 'ftp' is neither http nor https",
    "app.example.com": "no scheme://",
    "null": "no scheme://",
    "https://app.example.com:0": "the port '0' is not a number from 1 to 65535",
    "https://app.example.com:https": "the port 'https' is not a number from 1 to 65535",
    "https://app_example.com": "'app_example.com' is not a host name",
    "https://bücher.example": "a host name outside ASCII is written as the browser sends it (xn--...)",
    "http://[::g]": "[::g] is not an IPv6 address",
}


@pytest.mark.parametrize("bad", list(BAD))
def test_an_entry_that_is_not_an_exact_origin_is_refused_by_name(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARAVAN_CORS_ORIGINS", f"https://ok.example.com, {bad}")
    with pytest.raises(ValidationError) as refused:
        Settings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("cors_origins",)
    assert error["msg"] == (
        f"Value error, {bad!r} is not an origin (scheme://host[:port], e.g. https://app.example.com): {BAD[bad]}"
    )
