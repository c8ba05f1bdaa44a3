"""A token in a URL (``?token=`` on the WebSocket, where browsers cannot send a header; on any other route all the
same) and an API key pasted into one never reach a log line: uvicorn's access log and its WebSocket lines, with the
server at INFO and its access log on, as an operator who raises the log level gets them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import AccessFormatter, DefaultFormatter

from control.cli import _server_config
from control.platform import ControlPlane
from control.settings import Settings
from gateway.logredact import RedactUrls
from tests.conftest import Api
from tests.gateway.test_tasks_api import finished, running_agent, start_task
from tests.support.helpers import log_records

LOGGERS = ("uvicorn.access", "uvicorn.error")
_FORMATS = LOGGING_CONFIG["formatters"]
FORMATTERS = {
    "uvicorn.access": AccessFormatter(_FORMATS["access"]["fmt"], use_colors=False),
    "uvicorn.error": DefaultFormatter(_FORMATS["default"]["fmt"], use_colors=False),
}


def lines(records: list[logging.LogRecord]) -> str:
    """The records as uvicorn's own handlers write them, and each one's plain message."""
    return "\n".join(line for r in records for line in (FORMATTERS[r.name].format(r), r.getMessage()))


def bearer(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def finished_task(api: Api, headers: dict[str, str]) -> str:
    agent = await running_agent(api, headers)
    task_id = await start_task(api, headers, agent["id"])
    assert (await finished(api, headers, task_id))["status"] == "completed"
    return task_id


async def test_a_token_or_key_in_an_http_query_is_not_logged(api: Api) -> None:
    admin = await api.admin()
    created = await api.client.post("/v1/admin/customers", json={"name": "acme"}, headers=admin)
    api_key = created.json()["api_key"]
    headers = await api.token(api_key)
    token = bearer(headers)
    events = f"/v1/tasks/{await finished_task(api, headers)}/events"
    with log_records(*LOGGERS) as records:
        sse = await api.client.get(f"{events}?token={token}", headers=headers)  # a client that sends both
        assert sse.status_code == 422 and "token: unknown query parameter" in sse.text  # the WebSocket's, not this
        assert (await api.client.get(f"{events}?after=0&token={token}")).status_code == 401  # the header only
        assert (await api.client.get(f"{events}?%74oken={token}")).status_code == 401  # the name spelt otherwise
        assert (await api.client.get(f"/v1/agents?api_key={api_key}", headers=headers)).status_code == 422
    logged = lines(records)
    assert token not in logged and api_key not in logged
    assert token.split(".")[2] not in logged  # nor its signature alone
    assert f"GET {events}?token=<redacted> HTTP/1.1" in logged  # the lines are there, with the rest of the URL
    assert f"GET {events}?after=0&token=<redacted> HTTP/1.1" in logged
    assert f"/v1/agents?api_key={api_key[:12]}_<redacted>" in logged  # as the audit log shows a key


async def test_a_token_in_a_websocket_url_is_not_logged(api: Api) -> None:
    _, headers = await api.new_customer()
    token = bearer(headers)
    task_id = await finished_task(api, headers)
    ws = api.base.replace("http", "ws") + f"/v1/tasks/{task_id}/ws"
    with log_records(*LOGGERS) as records:
        async with websockets.connect(f"{ws}?token={token}") as accepted:
            assert [frame async for frame in accepted]
        with pytest.raises(websockets.InvalidStatus):  # refused (a 404): logged all the same
            async with websockets.connect(f"{ws.replace(task_id, 'tk-000000000000')}?after={'0' * 32}&token={token}"):
                pass
    logged = lines(records)
    assert token not in logged and token.split(".")[2] not in logged
    assert f'"WebSocket /v1/tasks/{task_id}/ws?token=<redacted>" [accepted]' in logged
    assert f'"WebSocket /v1/tasks/tk-000000000000/ws?after={"0" * 32}&token=<redacted>" 404' in logged


JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjdS0xIn0.c2lnbmF0dXJl"
KEY = "cvn_0123abcd_c2VjcmV0LXNlY3JldC1zZWNyZXQ"


@pytest.mark.parametrize(
    ("msg", "args", "shown"),
    [
        ('"GET %s HTTP/1.1"', (f"/x?a=1&token={JWT}&b=2",), '"GET /x?a=1&token=<redacted>&b=2 HTTP/1.1"'),
        ("%s", ("/x?%74oken=not-a-jwt&token+=z",), "/x?%74oken=<redacted>&token+=z"),  # 'token ' is another name
        ("%s?%s", ("/x", "token=opaque"), "/x?token=<redacted>"),  # split over two arguments: the message is cut
        ("%(path)s", ({"path": f"/v1/admin/keys/{KEY}"},), "/v1/admin/keys/cvn_0123abcd_<redacted>"),
        (f"plain /v1/agents?q={KEY}&token={JWT}", (), "plain /v1/agents?q=cvn_0123abcd_<redacted>&token=<redacted>"),
        ("started %d", (42,), "started 42"),
    ],
)
def test_the_filter_redacts_urls_however_they_are_logged(msg: str, args: Any, shown: str) -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, msg, args, None)
    assert RedactUrls().filter(record)  # not installed here: the servers above must have been by create_app
    assert record.getMessage() == shown


@pytest.mark.parametrize("access_log", [False, True])
async def test_caravan_access_log_turns_on_uvicorns_access_lines_redacted(
    control: ControlPlane, settings: Settings, access_log: bool
) -> None:
    """``CARAVAN_ACCESS_LOG`` is the one switch an operator needs: without it the server writes no line per
    request; with it, one each, its token redacted."""
    chosen = settings.model_copy(update={"access_log": access_log, "http_port": 0})
    server = uvicorn.Server(_server_config(chosen, control))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        with log_records("uvicorn.access", level=None) as records:  # (at the level the server set)
            async with httpx.AsyncClient() as client:
                answered = await client.get(f"http://127.0.0.1:{port}/v1/tasks?token=eyJhbGciOi.eyJzdWIi.c2lnbmF0dXJl")
            assert answered.status_code == 401
    finally:
        server.should_exit = True
        await serving
    written = [FORMATTERS["uvicorn.access"].format(record) for record in records]
    if not access_log:
        assert written == []
    else:
        assert len(written) == 1 and '"GET /v1/tasks?token=<redacted> HTTP/1.1" 401' in written[0], written
