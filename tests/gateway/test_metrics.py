"""``GET /metrics``: Prometheus' text format, requests counted by route template (never a raw path), and the
control plane's agents, tasks, customers and killswitch flags as gauges, with no customer named anywhere."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from agent.protocol import EventKind
from control.ids import new_id
from control.metrics import Metrics, Snapshot, snapshot
from control.models import AgentStatus, Task, TaskStatus
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.services.tasks import task_key
from control.store import Repo
from gateway.app import MAX_BODY_BYTES
from tests.conftest import Api, make_settings, serve_api
from tests.control.test_killswitch import killswitch
from tests.gateway.test_agents_api import agent_body
from tests.gateway.test_tasks_api import task_event, tracker_caught_up
from tests.support.helpers import assert_eventually, stalled

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"(?:,|$)')
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """A strict reading of the text format: every sample parses, and belongs to a family declared before it."""
    samples: Samples = {}
    families: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            families[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample: {line!r}"
        name, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in families else name
        assert family in families, f"{name} has no TYPE"
        pairs = _LABEL.findall(labels or "")
        assert ",".join(f'{k}="{v}"' for k, v in pairs) == (labels or ""), f"bad labels: {labels!r}"
        samples[(name, frozenset(pairs))] = float(value)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(api: Api) -> tuple[str, Samples]:
    response = await api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return response.text, parse(response.text)


async def test_requests_are_counted_by_route_template_and_the_platform_shows_as_gauges(api: Api) -> None:
    customer_id, headers = await api.new_customer("metered")
    _, before = await scrape(api)
    for _ in range(3):
        assert (await api.client.get("/v1/agents", headers=headers)).status_code == 200
    assert (await api.client.get("/v1/tasks/tk-000000000000", headers=headers)).status_code == 404
    assert (await api.client.get("/v1/probe-9f3a/../etc?x=<b>", headers=headers)).status_code == 404
    assert (await api.client.post("/v1/agents", json={"name": 7}, headers=headers)).status_code == 422
    assert (await api.client.request("PROPFIND", "/v1/agents", headers=headers)).status_code == 405
    assert (await api.client.get("/openapi.json")).status_code == 200  # a route of Starlette's own
    too_large = b"x" * (MAX_BODY_BYTES + 1)  # refused by its Content-Length, before any route reads it
    assert (await api.client.post("/v1/agents", content=too_large, headers=headers)).status_code == 413
    created = await api.client.post("/v1/agents", json=agent_body(name="counted"), headers=headers)
    assert created.status_code == 201
    await killswitch(api, scope="customer", customer_id=customer_id, reason="metrics test", wait_ms=0)

    text, after = await scrape(api)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("caravan_http_requests_total", method="GET", route="/v1/agents", status="200") == 3
    assert delta("caravan_http_request_duration_seconds_count", method="GET", route="/v1/agents") == 3
    assert delta("caravan_http_requests_total", method="GET", route="/v1/tasks/{task_id}", status="404") == 1
    assert delta("caravan_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert delta("caravan_http_requests_total", method="POST", route="/v1/agents", status="422") == 1
    assert delta("caravan_http_requests_total", method="other", route="/v1/agents", status="405") == 1
    assert delta("caravan_http_requests_total", method="GET", route="/openapi.json", status="200") == 1
    assert delta("caravan_http_requests_total", method="POST", route="/v1/agents", status="413") == 1
    assert delta("caravan_http_requests_total", method="POST", route="/v1/agents", status="201") == 1
    for leaked in ("probe-9f3a", "PROPFIND", customer_id, created.json()["id"], "metered"):
        assert leaked not in text  # no raw path, no client's method, no customer or agent in a label

    buckets = sorted(
        (float(dict(labels)["le"]), count)
        for (name, labels), count in after.items()
        if name == "caravan_http_request_duration_seconds_bucket"
        and dict(labels)["route"] == "/v1/agents"
        and dict(labels)["method"] == "GET"
    )
    assert [count for _, count in buckets] == sorted(count for _, count in buckets)  # cumulative
    count = value(after, "caravan_http_request_duration_seconds_count", method="GET", route="/v1/agents")
    assert buckets[-1] == (float("inf"), count)

    stats = (await api.client.get("/v1/admin/stats", headers=await api.admin())).json()
    assert value(after, "caravan_ready") == 1
    assert value(after, "caravan_customers") == stats["customers"]
    agents = [value(after, "caravan_agents", status=status) for status in AgentStatus]
    assert sum(agents) == sum(stats["agents_by_status"].values()) == 1  # (its status moves on as it starts)
    assert all(("caravan_agents", frozenset({("status", status)})) in after for status in AgentStatus)  # 0s too
    for status in TaskStatus:
        assert value(after, "caravan_tasks", status=status) == stats["tasks_by_status"].get(status, 0), status
    assert value(after, "caravan_killswitch_engaged", scope="customer") == 1
    assert value(after, "caravan_killswitch_engaged", scope="all") == 0

    await killswitch(api, scope="customer", customer_id=customer_id, engaged=False)
    _, released = await scrape(api)
    assert value(released, "caravan_killswitch_engaged", scope="customer") == 0


def test_the_text_format_escapes_labels_and_leaves_out_what_could_not_be_read() -> None:
    metrics = Metrics()
    metrics.request("GET", 'a"b\\c\nd', 200, 0.02)
    metrics.request("GET", 'a"b\\c\nd', 200, 7.0)
    text = metrics.scrape(Snapshot(ready=False))  # NATS down: only what the process itself knows
    samples = parse(text)
    route = 'a\\"b\\\\c\\nd'
    assert f'caravan_http_requests_total{{method="GET",route="{route}",status="200"}} 2' in text.splitlines()
    assert f'caravan_http_request_duration_seconds_bucket{{le="0.025",method="GET",route="{route}"}} 1' in text
    assert f'caravan_http_request_duration_seconds_bucket{{le="10.0",method="GET",route="{route}"}} 2' in text
    assert f'caravan_http_request_duration_seconds_bucket{{le="+Inf",method="GET",route="{route}"}} 2' in text
    assert value(samples, "caravan_http_request_duration_seconds_sum", method="GET", route=route) == 7.02
    assert value(samples, "caravan_ready") == 0
    assert not any(name in {"caravan_agents", "caravan_tasks", "caravan_customers"} for name, _ in samples)


async def test_a_scrape_answers_when_the_control_plane_cannot_be_read() -> None:
    async def unreadable() -> Any:
        raise ConnectionError("nats: connection closed")

    async def answering() -> bool:
        return True

    half_down = SimpleNamespace(
        answering=answering,
        stats=SimpleNamespace(counts=unreadable),
        killswitch=SimpleNamespace(engaged=unreadable),
        tasks=SimpleNamespace(folding=True, backlog=unreadable),
        scheduler=SimpleNamespace(name="local"),  # no event feed
    )
    read = await snapshot(cast(ControlPlane, half_down))
    assert read == Snapshot(ready=True, folding=True)  # nothing made up: what could not be read is missing
    samples = parse(Metrics().scrape(read))
    assert value(samples, "caravan_ready") == 1 and not any(name == "caravan_agents" for name, _ in samples)


async def test_the_tracker_shows_whether_this_control_plane_folds_and_how_many_events_wait(api: Api) -> None:
    """An operator sees the task records fall behind (no replica folding, or one that cannot keep up)."""
    await tracker_caught_up(api)
    _, folding = await scrape(api)
    assert value(folding, "caravan_tracker_folding") == 1
    assert value(folding, "caravan_tracker_events_unfolded") == 0
    await api.control.tasks.stop_tracker()
    for n in range(3):
        await api.control.tasks.publish(task_event("cu-000000000000", "tk-000000000000", EventKind.STATUS, str(n)))
    _, stopped = await scrape(api)
    assert value(stopped, "caravan_tracker_folding") == 0
    assert value(stopped, "caravan_tracker_events_unfolded") == 3
    await api.control.tasks.start_tracker(api.control.agents.on_agent_event)
    await tracker_caught_up(api)
    _, again = await scrape(api)
    assert value(again, "caravan_tracker_folding") == 1
    assert value(again, "caravan_tracker_events_unfolded") == 0


async def test_the_local_scheduler_has_no_event_feed_to_watch(api: Api) -> None:
    """It watches its own processes: /readyz says so with a null, and /metrics has no gauge for it (a constant 1
    would be made up; the Nomad scheduler's is tested in tests/control/test_nomad_agents.py)."""
    ready = await api.client.get("/readyz")
    assert ready.json()["scheduler"] == "local"
    assert "scheduler_events" in ready.json() and ready.json()["scheduler_events"] is None
    _, samples = await scrape(api)
    assert value(samples, "caravan_ready") == 1
    assert not any(name == "caravan_scheduler_events_connected" for name, _ in samples)


async def test_a_stalled_nats_makes_the_platform_not_ready_and_its_requests_503_and_it_recovers(
    nats_server: EmbeddedNats, api: Api
) -> None:
    """A NATS server that stops answering (paused here; overloaded, or cut off by a partition) keeps its TCP
    connections open: readiness asks it for a round trip, a scrape says not ready at once rather than waiting
    past the scraper's timeout, and a request that needs it is a 503 to retry, not a 500."""
    _, headers = await api.new_customer()
    assert (await api.client.get("/readyz")).status_code == 200
    with stalled(nats_server.pid):
        ready = await api.client.get("/readyz")
        assert (ready.status_code, ready.json()["status"]) == (503, "not ready")
        scraped = parse((await api.client.get("/metrics")).text)
        assert scraped[("caravan_ready", frozenset())] == 0
        assert not any(name == "caravan_agents" for name, _ in scraped)  # not read: it would only wait
        listed = await api.client.get("/v1/agents", headers=headers)
        assert listed.status_code == 503, listed.text
        assert listed.json()["error"]["code"] == "unavailable" and listed.headers["Retry-After"] == "1"
    await assert_eventually(lambda: api.client.get("/readyz"), lambda r: r.status_code == 200, what="ready")
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []
    documented = (await api.client.get("/openapi.json")).json()["paths"]["/readyz"]["get"]["responses"]
    assert {"200", "503"} <= set(documented), documented  # a probe's author learns of the 503 from the schema


async def test_a_scrape_counts_tasks_in_flight_afresh_and_reads_every_record_only_once_an_interval(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """Ended tasks pile up for the retention time (30 days): a scrape (or the dashboard's statistics, every 5 s)
    must not read every record each time. Tasks in flight are read from their quota slots at every scrape; the
    ended ones are counted from every record once an interval, in the background, and the stale count is served
    meanwhile."""
    settings = make_settings(nats_server.url, tmp_path / "data", task_count_interval_s=3600)
    async with ControlPlane(settings) as control, serve_api(control) as api:
        customer_id, _ = await api.new_customer("piled")
        records = Repo(control.jet.kv["tasks"], Task)

        async def task(status: TaskStatus, in_flight: bool = False) -> str:
            made = Task(id=new_id("tk"), customer_id=customer_id, task="count", status=status)
            if in_flight:
                await control.quotas.reserve_task(customer_id, made.id)
            await records.create(task_key(customer_id, made.id), made)
            return made.id

        for _ in range(5):
            await task(TaskStatus.COMPLETED)
        await task(TaskStatus.FAILED)
        live = await task(TaskStatus.RUNNING, in_flight=True)
        reads: list[str] = []
        every_record = records.list_as

        async def counted(model: Any, pattern: str = ">") -> Any:
            reads.append(pattern)
            return await every_record(model, pattern)

        cast(Any, control.stats)._tasks.list_as = counted
        admin = await api.admin()
        first = (await api.client.get("/v1/admin/stats", headers=admin)).json()
        assert first["tasks_by_status"] == {"completed": 5, "failed": 1, "running": 1}
        assert len(reads) == 1

        # the running task asks the human and another ends: a scrape sees the first at once, not yet the second
        await records.update(
            task_key(customer_id, live), lambda t: t.model_copy(update={"status": TaskStatus.AWAITING_INPUT})
        )
        await task(TaskStatus.CANCELLED)
        _, scraped = await scrape(api)
        assert value(scraped, "caravan_tasks", status="awaiting_input") == 1
        assert value(scraped, "caravan_tasks", status="running") == 0
        assert value(scraped, "caravan_tasks", status="completed") == 5
        assert value(scraped, "caravan_tasks", status="cancelled") == 0  # counted at the next interval
        again = (await api.client.get("/v1/admin/stats", headers=admin)).json()
        assert again["ended_counted_at"] == first["ended_counted_at"]
        assert len(reads) == 1  # two scrapes and a second overview read no record but the one in flight

        cast(Any, control.stats)._ended._max_age_s = 0.01  # the interval passes
        caught_up = await assert_eventually(
            lambda: api.client.get("/v1/admin/stats", headers=admin),
            lambda r: r.json()["tasks_by_status"].get("cancelled") == 1,
            what="the ended tasks counted again",
        )
        assert caught_up.json()["ended_counted_at"] > first["ended_counted_at"]
        assert caught_up.json()["tasks_by_status"]["awaiting_input"] == 1
