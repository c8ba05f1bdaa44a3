"""Prometheus metrics of a Caravan API process (``GET /metrics``), kept with the OpenTelemetry SDK.

The instruments are OpenTelemetry's, on a meter provider of the process's own (nothing global: two apps in one
process keep theirs apart, and an operator can add an exporter to it); a scrape collects them and writes them in
Prometheus' text format (version 0.0.4). Recorded as they happen: the API's requests by method, route template
and status, and their time to the response's headers. Read at each scrape: agents and tasks by status,
customers, killswitch flags engaged by scope, whether the control plane is ready, the tracker's: whether this
control plane folds the task events (holds its lease), and how many events wait to be folded, and whether the
scheduler follows the cluster's changes (Nomad's event stream; absent for the local scheduler, which has no such
feed: a constant 1 there would only be made up).

No label names a customer, an agent or a raw path: the endpoint is unauthenticated, as the probes are, and a
path nobody routes is counted as ``unmatched`` (a scan of random paths cannot grow the series without bound).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricsData,
    NumberDataPoint,
    Sum,
)

from agent.backends.base import Scope
from control.backends.base import event_feed
from control.models import AgentStatus, TaskStatus

if TYPE_CHECKING:
    from control.platform import ControlPlane

__all__ = ["CONTENT_TYPE", "Metrics", "Snapshot", "exposition", "snapshot"]

log = logging.getLogger("caravan.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Snapshot:
    """What a scrape reads from the control plane; None where it could not be read (NATS down)."""

    ready: bool
    customers: int | None = None
    agents_by_status: Mapping[str, int] | None = None
    tasks_by_status: Mapping[str, int] | None = None
    killswitch_by_scope: Mapping[str, int] | None = None
    tracker_backlog: int | None = None
    folding: bool | None = None
    scheduler_events_connected: bool | None = None
    """None: the scheduler has no event feed (the local one)."""


async def snapshot(control: ControlPlane) -> Snapshot:
    """Read what the gauges show; a part that cannot be read (NATS down) is left out, and the rest still served."""
    read = Snapshot(ready=await control.answering())
    feed = event_feed(control.scheduler)  # the process's own: read even while NATS is down
    read.scheduler_events_connected = None if feed is None else feed.connected
    if not read.ready:  # reading would only wait for NATS, past the scraper's own timeout
        return read
    read.folding = control.tasks.folding
    try:
        counts = await control.stats.counts()
        read.customers, read.agents_by_status, read.tasks_by_status = (
            counts.customers,
            counts.agents_by_status,
            counts.tasks_by_status,
        )
    except Exception as exc:  # the scrape still answers: what could not be read is missing, and logged
        log.warning("metrics: could not count agents and tasks: %s", exc)
    try:
        read.killswitch_by_scope = Counter(flag.scope.value for flag in await control.killswitch.engaged())
    except Exception as exc:
        log.warning("metrics: could not read the killswitch flags: %s", exc)
    try:
        read.tracker_backlog = await control.tasks.backlog()
    except Exception as exc:
        log.warning("metrics: could not read the tracker's backlog: %s", exc)
    return read


class Metrics:
    """The metrics of one API process: :meth:`request` for each request, :meth:`scrape` for ``GET /metrics``."""

    def __init__(self) -> None:
        self._reader = InMemoryMetricReader()
        self._provider = MeterProvider(metric_readers=[self._reader], shutdown_on_exit=False)  # no thread to stop
        meter = self._provider.get_meter("caravan")
        self._requests = meter.create_counter(
            "caravan_http_requests", unit="1", description="API requests answered, by method, route and status."
        )
        self._durations = meter.create_histogram(
            "caravan_http_request_duration_seconds",
            unit="s",
            description="Time from a request to its response's headers, by method and route.",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self._snapshot = Snapshot(ready=False)
        meter.create_observable_gauge(
            "caravan_ready", [self._observe_ready], description="1 when the control plane is started and on NATS."
        )
        meter.create_observable_gauge("caravan_customers", [self._observe_customers], description="Customers.")
        meter.create_observable_gauge(
            "caravan_agents", [self._observe_agents], description="Agents by status (every status, 0 included)."
        )
        meter.create_observable_gauge(
            "caravan_tasks", [self._observe_tasks], description="Tasks kept, by status (every status, 0 included)."
        )
        meter.create_observable_gauge(
            "caravan_tracker_events_unfolded",
            [self._observe_backlog],
            description="Task events stored and not yet folded into the records (by whichever replica folds).",
        )
        meter.create_observable_gauge(
            "caravan_tracker_folding",
            [self._observe_folding],
            description="1 when this process's control plane folds the task events (it holds the tracker's lease).",
        )
        meter.create_observable_gauge(
            "caravan_scheduler_events_connected",
            [self._observe_scheduler_events],
            description="1 while the scheduler follows the cluster's changes (Nomad's event stream); 0 while it "
            "reconnects and agents' statuses may be stale. Absent for the local scheduler.",
        )
        meter.create_observable_gauge(
            "caravan_killswitch_engaged",
            [self._observe_killswitch],
            description="Killswitch flags engaged, by scope (all, customer, agent).",
        )

    def request(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """Count one answered request. ``route`` is the route's template (None: nothing routed it)."""
        method = method if method in METHODS else "other"
        labels = {"method": method, "route": route or "unmatched"}
        self._requests.add(1, {**labels, "status": str(status)})
        self._durations.record(seconds, labels)

    def scrape(self, snapshot: Snapshot) -> str:
        """Everything, in Prometheus' text format, with the gauges read from ``snapshot``."""
        self._snapshot = snapshot
        data = self._reader.get_metrics_data()
        return exposition(data) if data is not None else ""

    # -- gauges, read from the snapshot of the scrape under way ----------------------------------------------

    def _observe_ready(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1 if self._snapshot.ready else 0)]

    def _observe_customers(self, options: CallbackOptions) -> Iterable[Observation]:
        customers = self._snapshot.customers
        return [] if customers is None else [Observation(customers)]

    def _observe_agents(self, options: CallbackOptions) -> Iterable[Observation]:
        return _by(self._snapshot.agents_by_status, "status", [s.value for s in AgentStatus])

    def _observe_tasks(self, options: CallbackOptions) -> Iterable[Observation]:
        return _by(self._snapshot.tasks_by_status, "status", [s.value for s in TaskStatus])

    def _observe_backlog(self, options: CallbackOptions) -> Iterable[Observation]:
        backlog = self._snapshot.tracker_backlog
        return [] if backlog is None else [Observation(backlog)]

    def _observe_folding(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self._snapshot.folding is None else [Observation(1 if self._snapshot.folding else 0)]

    def _observe_scheduler_events(self, options: CallbackOptions) -> Iterable[Observation]:
        connected = self._snapshot.scheduler_events_connected
        return [] if connected is None else [Observation(1 if connected else 0)]

    def _observe_killswitch(self, options: CallbackOptions) -> Iterable[Observation]:
        return _by(self._snapshot.killswitch_by_scope, "scope", [s.value for s in Scope])


def _by(counts: Mapping[str, int] | None, label: str, every: list[str]) -> list[Observation]:
    if counts is None:
        return []
    return [Observation(counts.get(value, 0), {label: value}) for value in every]


# -- Prometheus' text format -------------------------------------------------------------------------------


def exposition(data: MetricsData) -> str:
    """``data`` in Prometheus' text exposition format 0.0.4: a monotonic sum is a counter named ``<name>_total``,
    a gauge or other sum a gauge, a histogram its cumulative ``_bucket`` series with ``_sum`` and ``_count``."""
    lines: list[str] = []
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points = metric.data
                if isinstance(points, Sum) and points.is_monotonic:
                    name, kind = f"{metric.name}_total", "counter"
                elif isinstance(points, Sum | Gauge):
                    name, kind = metric.name, "gauge"
                elif isinstance(points, Histogram):
                    name, kind = metric.name, "histogram"
                else:  # pragma: no cover - an instrument kind this module does not make
                    continue
                lines.append(f"# HELP {name} {_help(metric.description or '')}")
                lines.append(f"# TYPE {name} {kind}")
                for point in points.data_points:
                    attributes = dict(point.attributes or {})
                    if isinstance(point, NumberDataPoint):
                        lines.append(f"{name}{_labels(attributes)} {_number(point.value)}")
                    elif isinstance(point, HistogramDataPoint):
                        cumulative = 0
                        for bound, count in zip([*point.explicit_bounds, math.inf], point.bucket_counts, strict=True):
                            cumulative += count
                            lines.append(f"{name}_bucket{_labels({**attributes, 'le': _number(bound)})} {cumulative}")
                        lines.append(f"{name}_sum{_labels(attributes)} {_number(point.sum)}")
                        lines.append(f"{name}_count{_labels(attributes)} {point.count}")
    return "\n".join(lines) + "\n"


def _labels(attributes: Mapping[str, Any]) -> str:
    if not attributes:
        return ""
    pairs = (f'{key}="{_escape(str(value))}"' for key, value in sorted(attributes.items()))
    return "{" + ",".join(pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
