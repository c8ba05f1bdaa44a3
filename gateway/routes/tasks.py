from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Annotated

from fastapi import Header, Query, Request, WebSocket, WebSocketDisconnect, status
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from agent.protocol import ID_PATTERN
from control import eventids
from control.errors import CaravanError, Invalid
from control.models import Task, TaskCreate, TaskStatus
from control.platform import ControlPlane
from control.services.tasks import StreamedEvent
from control.teams.models import TeamInput
from gateway.deps import (
    ControlDep,
    ListedQuery,
    PrincipalDep,
    StreamsDep,
    answering_head,
    customer_only,
    get_principal,
    listed_scope,
    owner_scope,
    refused_query,
)
from gateway.errors import caravan_error_response, refuse_websocket
from gateway.routes import api_router
from gateway.schemas import TaskPublic
from gateway.streams import HeldStream

router = api_router("/v1/tasks", "tasks")


def _public(task: Task) -> TaskPublic:
    return TaskPublic.of(task)


def _task_record(control: ControlPlane, task_id: str) -> Callable[[], Awaitable[Task]]:
    """Reads the task an admin acts on (the record alone), for the audit record to name its customer."""
    return lambda: control.tasks.get(None, task_id, transcript=False)


def _resume_point(control: ControlPlane, task: Task, event_id: str | None, given_as: str) -> int:
    """The stream sequence after which ``task``'s events resume: that of the event ``event_id`` names (0, from
    the start, when none is given)."""
    if not event_id:
        return 0
    sequence = control.event_ids.decode(task.id, event_id)
    if sequence is None:
        raise Invalid(f"{given_as} must be the id of an event of this task, as its stream gave it")
    return sequence


def _wire(control: ControlPlane, task: Task, item: StreamedEvent) -> dict[str, object]:
    return {"id": control.event_ids.encode(task.id, item.id), **item.event.model_dump(mode="json")}


@router.post("", response_model=TaskPublic, status_code=status.HTTP_202_ACCEPTED)
async def create_task(body: TaskCreate, control: ControlDep, principal: PrincipalDep) -> TaskPublic:
    """Queue a task for an agent or a team. Watch it on `/v1/tasks/{id}/events`."""
    customer_id = customer_only(principal, "a task is started by the customer who owns the agent or team")
    return _public(await control.tasks.create(customer_id, body))


@router.get("", response_model=list[TaskPublic])
async def list_tasks(
    control: ControlDep,
    principal: PrincipalDep,
    status_filter: Annotated[TaskStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        str | None, Query(min_length=1, max_length=64, description="A task's id: the tasks created before it.")
    ] = None,
    agent_id: Annotated[
        str | None,
        Query(
            pattern=ID_PATTERN,
            description="Only the tasks given to this agent (not those of its teams); not with `team_id`.",
        ),
    ] = None,
    team_id: Annotated[
        str | None, Query(pattern=ID_PATTERN, description="Only the tasks given to this team; not with `agent_id`.")
    ] = None,
    customer_id: ListedQuery = None,
) -> list[TaskPublic]:
    """The newest tasks first, with their transcripts. The next page: ``before`` the last task of this one. With
    ``agent_id`` or ``team_id`` (one of them: both is a 422), only that agent's or team's tasks, each page filled
    with them; an id that names none of the caller's agents or teams lists none."""
    if agent_id is not None and team_id is not None:
        raise Invalid("?agent_id= and ?team_id= exclude each other: give one of them")
    scope = listed_scope(principal, customer_id)
    tasks = await control.tasks.list(scope, status_filter, limit, before, agent_id=agent_id, team_id=team_id)
    return [_public(t) for t in tasks]


@router.get("/{task_id}", response_model=TaskPublic)
async def get_task(task_id: str, control: ControlDep, principal: PrincipalDep) -> TaskPublic:
    """Status, transcript, result and token usage."""
    return _public(await control.tasks.get(owner_scope(principal), task_id))


@router.post("/{task_id}/cancel", response_model=TaskPublic, status_code=status.HTTP_202_ACCEPTED)
async def cancel_task(task_id: str, control: ControlDep, principal: PrincipalDep) -> TaskPublic:
    """Ask for the task to stop; it ends `cancelled` (watch the events)."""
    async with control.audit.admin_action(
        principal, "task.cancel", target=task_id, owner=_task_record(control, task_id)
    ):
        task = await control.tasks.cancel(owner_scope(principal), task_id)
    return _public(task)


@router.post("/{task_id}/input", response_model=TaskPublic, status_code=status.HTTP_202_ACCEPTED)
async def task_input(task_id: str, body: TeamInput, control: ControlDep, principal: PrincipalDep) -> TaskPublic:
    """Answer a team that asked (status `awaiting_input`); the team goes on from where it stopped. A task on an
    agent alone never asks (409): an agent asks in a team of one, with a handoff to `user`."""
    async with control.audit.admin_action(
        principal, "task.input", target=task_id, owner=_task_record(control, task_id)
    ):
        task = await control.tasks.input(owner_scope(principal), task_id, body.content, body.segment)
    return _public(task)


@router.get(
    "/{task_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"},
        204: {"description": "The task ended and has no event after the resume point: nothing to stream."},
    },
)
async def task_events(
    request: Request,
    task_id: str,
    control: ControlDep,
    principal: PrincipalDep,
    streams: StreamsDep,
    last_event_id: Annotated[str | None, Header(max_length=eventids.ID_LENGTH)] = None,
    after: Annotated[str | None, Query(pattern=eventids.ID_PATTERN, description="Resume after this event id.")] = None,
) -> Response:
    """Server-sent events of the task from the start, or after `Last-Event-ID` or `?after=` (both given: after the
    later of the two, as an `EventSource` opened with `?after=` reconnects); ends after the final status. A 204
    for a task that ended with nothing after the resume point: an `EventSource`, which reconnects whenever a stream
    closes, stops there. A 429 (`too_many_streams`) for a customer who holds their limit of open streams already."""
    task = await control.tasks.get(owner_scope(principal), task_id, transcript=False)  # the events carry the rest
    # both given: the later of the two. An EventSource opened with ?after= reconnects to the same URL, sending the
    # last id it saw as Last-Event-ID: resuming at ?after= would replay what it had already
    start = max(
        _resume_point(control, task, after, "?after="),
        _resume_point(control, task, last_event_id, "Last-Event-ID"),
    )
    if await control.tasks.ended_before(task, start):
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    async def stream() -> AsyncGenerator[bytes, None]:
        yield b"retry: 1000\n\n"
        async for item in control.tasks.events(task, start):
            if item is None:
                yield b": keep-alive\n\n"
                continue
            wire = _wire(control, task, item)
            yield f"id: {wire['id']}\nevent: {item.event.kind}\ndata: {json.dumps(wire)}\n\n".encode()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if answering_head(request):  # a HEAD's ends with its headers: nothing to watch, nothing counted
        return StreamingResponse(iter(()), media_type="text/event-stream", headers=headers)
    return HeldStream(stream(), streams.hold(principal), media_type="text/event-stream", headers=headers)


@router.websocket("/{task_id}/ws")
async def task_ws(
    websocket: WebSocket,
    task_id: str,
    control: ControlDep,
    streams: StreamsDep,
    token: Annotated[str | None, Query(max_length=4096)] = None,
    after: Annotated[str | None, Query(pattern=eventids.ID_PATTERN, description="Resume after this event id.")] = None,
) -> None:
    """The same events as JSON frames. Authenticate with `Authorization: Bearer` or `?token=`; resume with `?after=`.
    Counted with the SSE streams against the customer's limit: past it, the handshake is refused with 429."""
    header = websocket.headers.get("authorization", "")
    bearer = header[7:] if header.lower().startswith("bearer ") else token
    credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=bearer) if bearer else None
    try:  # as every HTTP route: refusals audited and counted against the address, callers held to their rate
        principal = await get_principal(websocket, control, credentials)
        if (refused := refused_query(websocket)) is not None:
            raise refused
        task = await control.tasks.get(owner_scope(principal), task_id, transcript=False)
        start = _resume_point(control, task, after, "?after=")
        ended = await control.tasks.ended_before(task, start)  # a client that saw the whole stream: nothing more
        slot = None if ended else streams.hold(principal)
    except CaravanError as exc:
        await refuse_websocket(websocket, caravan_error_response(exc))
        return
    if slot is None:
        await websocket.accept()
        await websocket.close(code=1000)
        return
    try:
        await websocket.accept()
        async with asyncio.TaskGroup() as group:
            watching = group.create_task(_until_gone(websocket))
            async for item in control.tasks.events(task, start):
                await websocket.send_json({"type": "keep-alive"} if item is None else _wire(control, task, item))
            watching.cancel()
            await websocket.close(code=1000)
    except* WebSocketDisconnect:
        pass
    finally:
        slot.release()


async def _until_gone(websocket: WebSocket) -> None:
    """Reads what the client sends (the stream takes nothing: it is dropped) until it closes, then raises
    :class:`WebSocketDisconnect`: a stream learns that its client is gone at once, rather than when its next frame
    fails to go (a keep-alive comes only after 15 s without events), and gives back its consumer then."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
