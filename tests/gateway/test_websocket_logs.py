"""A WebSocket refused with an HTTP answer (a bad token, an unknown task) is an answer, not a server error: uvicorn
reports it as a handshake never completed, at ERROR, which :mod:`gateway.wslog` drops; an application that really
returns without answering is still reported."""

from __future__ import annotations

import logging
from typing import Any, cast

import pytest
import websockets
from fastapi import FastAPI, WebSocket

from gateway import wslog
from tests.conftest import Api
from tests.support.helpers import log_records, serve_app

UNFINISHED = "ASGI callable returned without completing handshake."


def errors(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.ERROR]


async def refused(url: str) -> int:
    with pytest.raises(websockets.InvalidStatus) as refusal:
        async with websockets.connect(url):
            pass
    return refusal.value.response.status_code


async def test_refused_websockets_log_no_error(api: Api) -> None:
    _, headers = await api.new_customer()
    token = headers["Authorization"].removeprefix("Bearer ")
    base = api.base.replace("http", "ws")
    with log_records("uvicorn.error") as records:
        assert await refused(f"{base}/v1/tasks/tk-000000000000/ws?token=not-a-token") == 401
        assert await refused(f"{base}/v1/tasks/tk-000000000000/ws?token={token}") == 404
        assert await refused(f"{base}/v1/tasks/tk-000000000000/ws?token={token}&after=x") == 422
    assert errors(records) == []
    refusals = [r.getMessage() for r in records if '"WebSocket /v1/tasks/tk-000000000000/ws' in r.getMessage()]
    assert len(refusals) == 3  # each still logged, at INFO, with its status


async def test_an_application_that_never_answers_a_handshake_is_still_an_error() -> None:
    wslog.install()  # as create_app does
    cast(Any, wslog._FILTER)._sent.clear()  # no denial pending from another test's server
    app = FastAPI()

    @app.websocket("/silent")
    async def silent(websocket: WebSocket) -> None:
        return None

    async with serve_app(app) as url:
        with log_records("uvicorn.error") as records:
            assert await refused(url.replace("http", "ws") + "/silent") == 500
    assert errors(records) == [UNFINISHED]
