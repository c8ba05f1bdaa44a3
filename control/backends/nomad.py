"""The Nomad scheduler: registers rendered jobs with a Nomad cluster and follows them through Nomad's own
event stream.

Every register is preceded by a read of the existing job (a job without this installation's ``caravan_owner``
meta is refused, :class:`JobNotOwned`) and a plan; the register then enforces the job modify index the plan
saw, so a job that changed hands in between is not overwritten. A customer's namespace is created on first use
and not asked about again, unless Nomad refuses a job as in a nonexistent namespace (an operator deleted it): then
it is created again. Model keys go to the job's Nomad Variable (``nomad/jobs/<job id>``), read by the task's
template, never into the job. Status comes from
``/v1/event/stream`` (topics Job, Allocation, Evaluation, Deployment): allocation and task states become
:class:`StatusUpdate`\\ s, and an evaluation that could not place the job reports Nomad's explanation. While the
stream is lost, statuses are stale: :meth:`NomadScheduler.event_feed` says so (``/readyz``, ``/metrics``), and the log
says it once at ERROR when the loss lasts or Nomad refuses the stream.

python-nomad is blocking; every call runs in a worker thread (the stream has its own thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nomad
import requests
from nomad.api import exceptions as nomad_errors

from agent.aio import cancel_and_wait
from agent.protocol import utcnow
from control.backends.base import (
    AllocState,
    EventFeed,
    JobNotOwned,
    JobRejected,
    JobStatus,
    SchedulerError,
    SchedulerUnreachable,
    StatusCallback,
    StatusUpdate,
    SubmitResult,
)
from control.jobspec import model_key_secret, task_secrets
from control.settings import Settings
from jobs import secrets_variable_path

__all__ = ["NomadConfig", "NomadError", "NomadScheduler", "NomadUnreachable", "alloc_state", "explain_placement"]

log = logging.getLogger("caravan.scheduler.nomad")

EVENT_TOPICS = ("Job", "Allocation", "Evaluation", "Deployment")
SECRETS_MARKER = "CARAVAN_SECRETS_SOURCE"
"""Always an item of the Variable: Nomad refuses an empty Variable, and a template waits for a missing one."""
FOREIGN_KEPT = 10_000  # jobs known not to be ours
ALLOCS_KEPT = 50_000  # allocations whose last reported state is kept (to report each change once)
STEADY_STREAM_S = 10.0
"""How long a stream must stay open to count as back (checked at each frame it sends; Nomad sends a heartbeat every
10 s). One that ends sooner, as a proxy ending every stream after its headers does, is one more failed attempt of
the loss it did not end: the back-off goes on growing (each connection lists every job again), the failures add up
and the ERROR comes."""
RECONNECT_FIRST_S = 0.5
RECONNECT_MOST_S = 15.0
"""The event stream's back-off: the wait before the first attempt to reconnect, doubled at each attempt that
fails, up to the most; back to the first once a stream is steady."""
LOST_ERROR_AFTER_S = 60.0
"""How long the event stream may stay lost before the log says so at ERROR, once (a refusal says so at once)."""
STREAM_ENDED = "Nomad ended the stream"
_STALE = "agents' statuses are stale until it is back (GET /readyz: scheduler_events); trying again meanwhile"
_CONNECTED = object()
_T = TypeVar("_T")


class NomadError(SchedulerError):
    """A Nomad API call failed; ``status`` is the HTTP status (None when Nomad could not be reached)."""

    def __init__(self, what: str, status: int | None, message: str) -> None:
        super().__init__(f"{what}: {status or 'no answer'} {message}".strip())
        self.status = status
        self.message = message


class NomadUnreachable(NomadError, SchedulerUnreachable):
    """A Nomad API call got no answer, or only a passing failure (see :func:`_call`) on its every attempt."""


@dataclass(frozen=True)
class NomadConfig:
    address: str
    token: str | None = None
    namespace_token: str | None = None
    region: str | None = None
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    skip_verify: bool = False
    timeout_s: float = 10.0
    install_id: str = "caravan"
    eval_wait_s: float = 5.0
    stream_read_timeout_s: float = 35.0
    secret_env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    """Where model keys are read; a job's Variable gets only the one its meta names (``caravan_model_key``)."""
    task_secrets: Mapping[str, str] = field(default_factory=dict)
    """What every job's Variable holds besides: the credentials written in the agents' NATS URL, the flag store's
    token and TLS settings (:func:`control.jobspec.task_secrets`)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> NomadConfig:
        def secret(value: Any) -> str | None:
            return value.get_secret_value() if value is not None else None

        return cls(
            address=settings.nomad_addr.rstrip("/"),
            token=secret(settings.nomad_token),
            namespace_token=secret(settings.nomad_namespace_token),
            region=settings.nomad_region,
            ca_cert=str(settings.nomad_cacert) if settings.nomad_cacert else None,
            client_cert=str(settings.nomad_client_cert) if settings.nomad_client_cert else None,
            client_key=str(settings.nomad_client_key) if settings.nomad_client_key else None,
            skip_verify=settings.nomad_skip_verify,
            timeout_s=settings.nomad_timeout_s,
            install_id=settings.install_id,
            task_secrets=task_secrets(settings, os.environ),
        )

    def client(self, token: str | None = None) -> nomad.Nomad:
        verify: bool | str = self.ca_cert or not self.skip_verify
        if self.skip_verify:
            verify = False
        cert = (self.client_cert, self.client_key) if self.client_cert and self.client_key else ()
        return nomad.Nomad(
            address=self.address,
            token=token or self.token,
            region=self.region,
            namespace=None,
            timeout=self.timeout_s,
            verify=verify,
            cert=cert,
        )


RETRY_AFTER_S = (0.25, 1.0)
"""How long a call that failed for a passing reason waits before each of its further attempts (:func:`_call`)."""
_PASSING_STATUS = frozenset({502, 503, 504})


def _call(
    requester: Any, what: str, *path: str, method: str = "get", attempts: int = 1 + len(RETRY_AFTER_S), **kwargs: Any
) -> requests.Response:
    """A call to Nomad's API; NomadError names what failed and Nomad's answer. A failure that passes (a connection
    refused or reset, a 502/503/504 from a proxy in front of Nomad, a 500 "No cluster leader" while the servers
    elect one) is tried again, ``attempts`` times in all, :data:`RETRY_AFTER_S` apart. A call that timed out is not:
    each attempt would wait its whole timeout again on a Nomad that hangs. One that got no answer, or still fails
    for a passing reason after its attempts, raises :class:`NomadUnreachable`. Every call Caravan makes may be made
    again: a read, a write of a whole value (a Variable, a namespace, a stop), or a job's check-and-set register
    (one that was done though its answer was lost is then refused as "Enforcing job modify index": submit plans
    again and finds the job as it wrote it)."""
    attempt = 0
    while True:
        try:
            response: requests.Response = requester.request(*path, method=method, **kwargs)
        except nomad_errors.BaseNomadException as exc:
            answer = exc.nomad_resp
            if isinstance(answer, requests.Response):
                status, message = answer.status_code, answer.text.strip()[:2000]
            else:
                status, message = None, str(answer)
            passing = _passing(answer)
        except requests.RequestException as exc:
            status, message, passing = None, str(exc), _passing(exc)
        else:
            return response
        error = (NomadUnreachable if passing or status is None else NomadError)(what, status, message)
        attempt += 1
        if not passing or attempt >= attempts:
            raise error from None
        pause = RETRY_AFTER_S[min(attempt, len(RETRY_AFTER_S)) - 1]
        log.info("%s; trying again in %.2fs", error, pause)
        time.sleep(pause)


def _passing(answer: object) -> bool:
    """Whether a failed call's answer (a response, or the error that stood for one) may pass on its own."""
    if isinstance(answer, requests.Response):
        if answer.status_code in _PASSING_STATUS:
            return True
        return answer.status_code == 500 and "no cluster leader" in answer.text.lower()
    return isinstance(answer, requests.ConnectionError) and not isinstance(answer, requests.Timeout)


def _task_event_message(event: Mapping[str, Any]) -> str:
    """What ``nomad alloc status`` shows for a task event (Nomad fills ``DisplayMessage``; older ones may not)."""
    if event.get("DisplayMessage"):
        return str(event["DisplayMessage"])
    kind = event.get("Type", "")
    if kind == "Terminated":
        parts = [f"Exit Code: {event.get('ExitCode', 0)}"]
        if event.get("Signal"):
            parts.append(f"Signal: {event['Signal']}")
        if event.get("Message"):
            parts.append(f"Exit Message: {json.dumps(event['Message'])}")
        return ", ".join(parts)
    for key in ("DriverError", "SetupError", "RestartReason", "KillError", "ValidationError", "DownloadError"):
        if event.get(key):
            return str(event[key])
    return str(event.get("Message") or kind)


_FAILURE_EVENTS = {"Not Restarting", "Driver Failure", "Setup Failure", "Failed Validation", "Killed", "Terminated"}


def _task_reason(name: str, state: Mapping[str, Any]) -> str | None:
    """The task's last words: why it exited, and why it is (not) restarted."""
    events = list(state.get("Events") or [])
    if not events:
        return None
    last = events[-1]
    terminated = next((e for e in reversed(events) if e.get("Type") == "Terminated"), None)
    parts = []
    if terminated is not None and terminated is not last:
        parts.append(_task_event_message(terminated))
    parts.append(_task_event_message(last))
    return f'task "{name}": ' + "; ".join(parts)


def alloc_state(alloc: Mapping[str, Any]) -> tuple[AllocState, str | None]:
    """Map a Nomad allocation (``ClientStatus`` and task states) onto an :class:`AllocState` and a reason."""
    status = alloc.get("ClientStatus")
    tasks: Mapping[str, Any] = alloc.get("TaskStates") or {}
    if status in ("pending", "running"):
        for name, state in sorted(tasks.items()):
            events = state.get("Events") or []
            if events and events[-1].get("Type") == "Restarting":
                return AllocState.RESTARTING, _task_reason(name, state)
        if status == "running":
            return AllocState.RUNNING, None
        started = any(len(state.get("Events") or []) > 1 for state in tasks.values())
        return (AllocState.STARTING if started else AllocState.PENDING), _rescheduled(alloc)
    if status == "failed":
        failed = [(n, s) for n, s in sorted(tasks.items()) if s.get("Failed")] or sorted(tasks.items())
        reasons = [r for n, s in failed if (r := _task_reason(n, s))]
        return AllocState.FAILED, "; ".join(reasons) or alloc.get("ClientDescription") or "allocation failed"
    if status == "lost":
        return AllocState.FAILED, f"allocation lost: {alloc.get('ClientDescription') or 'its node is down'}"
    if status == "unknown":
        return AllocState.RESTARTING, f"allocation unknown: {alloc.get('ClientDescription') or 'client disconnected'}"
    return AllocState.STOPPED, alloc.get("DesiredDescription") or alloc.get("ClientDescription") or "complete"


def _rescheduled(alloc: Mapping[str, Any]) -> str | None:
    """Why an allocation starts, if Nomad placed it in place of one that failed (the job's reschedule policy)."""
    events = (alloc.get("RescheduleTracker") or {}).get("Events") or []
    if not events:
        return None
    previous = str(events[-1].get("PrevAllocID") or "")[:8]
    return f"Nomad placed it again after allocation {previous} failed (reschedule {len(events)})"


def explain_placement(failed: Mapping[str, Mapping[str, Any]]) -> str:
    """Nomad's explanation of a failed placement, as ``nomad job status`` prints it, on one line."""
    out = []
    for group, metric in sorted(failed.items()):
        count = int(metric.get("CoalescedFailures") or 0) + 1
        lines = []
        if not metric.get("NodesEvaluated"):
            lines.append("No nodes were eligible for evaluation")
        for dc, available in sorted((metric.get("NodesAvailable") or {}).items()):
            if available == 0:
                lines.append(f"No nodes are available in datacenter {json.dumps(dc)}")
        for cls, num in sorted((metric.get("ClassFiltered") or {}).items()):
            lines.append(f"Class {json.dumps(cls)}: {num} nodes excluded by filter")
        for constraint, num in sorted((metric.get("ConstraintFiltered") or {}).items()):
            lines.append(f"Constraint {json.dumps(constraint)}: {num} nodes excluded by filter")
        if metric.get("NodesExhausted"):
            lines.append(f"Resources exhausted on {metric['NodesExhausted']} nodes")
        for cls, num in sorted((metric.get("ClassExhausted") or {}).items()):
            lines.append(f"Class {json.dumps(cls)} exhausted on {num} nodes")
        for dim, num in sorted((metric.get("DimensionExhausted") or {}).items()):
            lines.append(f"Dimension {json.dumps(dim)} exhausted on {num} nodes")
        for dim in metric.get("QuotaExhausted") or []:
            lines.append(f"Quota limit hit {json.dumps(dim)}")
        plural = "" if count == 1 else "s"
        out.append(f"Task Group {json.dumps(group)} (failed to place {count} allocation{plural}): " + "; ".join(lines))
    return " | ".join(out)


@dataclass
class _Tracked:
    meta: dict[str, str]
    placement: str | None = None


class NomadScheduler:
    name = "nomad"
    supports_stats = True

    def __init__(self, config: NomadConfig) -> None:
        self._config = config
        self._install_id = config.install_id
        self._api = config.client()
        self._ns_api = config.client(config.namespace_token) if config.namespace_token else self._api
        self._callbacks: list[StatusCallback] = []
        self._jobs: dict[tuple[str, str], _Tracked] = {}
        self._foreign: dict[tuple[str, str], None] = {}  # jobs seen on the event stream that are not ours
        self._allocs: dict[str, tuple[AllocState, str | None]] = {}  # the last state reported, per allocation
        self._namespaces: set[str] = set()
        self._started = False
        self._closed = False
        self._closing = threading.Event()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._stream: requests.Response | None = None
        self._last_index = 0
        self._feed = _FeedWatch()

    async def __aenter__(self) -> NomadScheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def on_status(self, callback: StatusCallback) -> None:
        self._callbacks.append(callback)

    def event_feed(self) -> EventFeed:
        return self._feed.state

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("nomad scheduler already started")
        self._started = True
        try:
            await asyncio.to_thread(_call, self._api.status.leader, "Nomad leader")
        except NomadError as exc:
            raise SchedulerError(f"cannot reach Nomad at {self._config.address}: {exc}") from exc
        self._loop = asyncio.get_running_loop()
        self._consumer = asyncio.create_task(self._consume(), name="nomad-events")
        self._reader = threading.Thread(target=self._follow, name="nomad-event-stream", daemon=True)
        self._reader.start()

    async def stop(self) -> None:
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        self._closing.set()
        stream = self._stream
        if stream is not None:
            await asyncio.to_thread(_abort, stream)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, self._config.stream_read_timeout_s + 5)
        if self._consumer is not None:
            await cancel_and_wait(self._consumer)

    def _require_running(self) -> None:
        if not self._started or self._closed:
            raise RuntimeError("nomad scheduler is not running")

    # -- jobs -------------------------------------------------------------------------------------------------

    async def submit(self, job: dict[str, Any], secrets: Mapping[str, str] | None = None) -> SubmitResult:
        self._require_running()
        try:
            namespace, job_id = str(job["Namespace"]), str(job["ID"])
        except KeyError as exc:
            raise JobRejected(f"job is missing {exc}") from exc
        meta = {str(k): str(v) for k, v in (job.get("Meta") or {}).items()}
        self._check_owner(meta, job_id)
        result, evaluation = await asyncio.to_thread(self._submit, job, namespace, job_id, meta, dict(secrets or {}))
        if evaluation is not None:
            await self._on_evaluation(evaluation)
        return result

    async def plan(self, job: dict[str, Any]) -> dict[str, Any]:
        """Nomad's dry run of ``job`` (``POST /v1/job/:id/plan`` with the diff); changes nothing."""
        self._require_running()
        namespace, job_id = str(job["Namespace"]), str(job["ID"])
        customer = str((job.get("Meta") or {}).get("caravan_customer", ""))

        def plan() -> dict[str, Any]:
            existing = self._get_job(namespace, job_id)
            if existing is not None:
                self._check_owner(existing.get("Meta") or {}, job_id)
            return self._plan(job, namespace, job_id)

        return await asyncio.to_thread(self._in_namespace, namespace, customer, plan)  # Nomad plans only in one

    async def stop_job(self, namespace: str, job_id: str) -> None:
        self._require_running()
        await asyncio.to_thread(self._stop_job, namespace, job_id)

    async def job_status(self, namespace: str, job_id: str) -> JobStatus | None:
        self._require_running()
        job = await asyncio.to_thread(self._get_job, namespace, job_id)
        if job is None or job.get("Stop"):
            return None  # a stopped job is not placed: an agent that should run is submitted again
        meta = {str(k): str(v) for k, v in (job.get("Meta") or {}).items()}
        self._remember(namespace, job_id, meta)
        allocs = await asyncio.to_thread(self._job_allocs, namespace, job_id)
        states: dict[str, AllocState] = {}
        reasons: dict[str, str] = {}
        for alloc in allocs:
            if alloc.get("DesiredStatus") != "run" and alloc.get("ClientStatus") in ("pending", "running"):
                continue
            state, reason = alloc_state(alloc)
            states[alloc["ID"]] = state
            if reason:
                reasons[alloc["ID"]] = reason
        return JobStatus(job_id, namespace, int(job.get("Version") or 0), states, reasons)

    async def alloc_stats(self, namespace: str, job_id: str) -> list[dict[str, Any]]:
        self._require_running()
        allocs = await asyncio.to_thread(self._job_allocs, namespace, job_id)
        running = [a["ID"] for a in allocs if a.get("ClientStatus") == "running"]
        found = await asyncio.gather(*(asyncio.to_thread(self._alloc_stats, namespace, a) for a in running))
        return [stats for stats in found if stats is not None]

    # -- blocking helpers (worker threads) -------------------------------------------------------------------

    def _check_owner(self, meta: Mapping[str, Any], job_id: str) -> None:
        if meta.get("caravan_owner") != self._install_id:
            raise JobNotOwned(f"job {job_id!r} is not owned by Caravan installation {self._install_id!r}")

    def _remember(self, namespace: str, job_id: str, meta: Mapping[str, Any]) -> _Tracked | None:
        key = (namespace, job_id)
        tracked = self._jobs.get(key)
        if meta.get("caravan_owner") != self._install_id:
            self._jobs.pop(key, None)
            self._mark_foreign(key)
            return None
        clean = {str(k): str(v) for k, v in meta.items()}
        self._foreign.pop(key, None)
        if tracked is None:
            tracked = self._jobs[key] = _Tracked(clean)
        else:
            tracked.meta = clean
        return tracked

    def _submit(
        self, job: dict[str, Any], namespace: str, job_id: str, meta: dict[str, str], secrets: dict[str, str]
    ) -> tuple[SubmitResult, dict[str, Any] | None]:
        customer = meta.get("caravan_customer", "")
        return self._in_namespace(namespace, customer, lambda: self._register(job, namespace, job_id, meta, secrets))

    def _in_namespace(self, namespace: str, customer_id: str, call: Callable[[], _T]) -> _T:
        """``call()``, which plans or registers a job in ``namespace``, once the namespace exists. A namespace
        known to exist is not asked about again; if an operator deleted it since (``nomad namespace delete``),
        Nomad refuses the job as in a nonexistent namespace (:func:`_namespace_gone`): it is forgotten, created
        again, and ``call()`` made once more. Its failing so again is reported as any refusal of the job is."""
        for attempt in (1, 2):
            self._ensure_namespace(namespace, customer_id)
            try:
                return call()
            except _NamespaceGone as gone:
                if attempt == 2:
                    raise gone.error from None
                log.warning("Nomad namespace %s no longer exists (%s); creating it again", namespace, gone.error)
                self._namespaces.discard(namespace)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _register(
        self, job: dict[str, Any], namespace: str, job_id: str, meta: dict[str, str], secrets: dict[str, str]
    ) -> tuple[SubmitResult, dict[str, Any] | None]:
        for attempt in (1, 2):
            existing = self._get_job(namespace, job_id)
            if existing is not None:
                self._check_owner(existing.get("Meta") or {}, job_id)
            plan = self._plan(job, namespace, job_id)
            if plan.get("FailedTGAllocs"):
                log.info("plan of %s/%s: %s", namespace, job_id, explain_placement(plan["FailedTGAllocs"]))
            model_key = model_key_secret(meta, self._config.secret_env)
            self._put_secrets(namespace, job_id, {**self._config.task_secrets, **model_key, **secrets})
            body = {"Job": job, "EnforceIndex": True, "JobModifyIndex": int(plan.get("JobModifyIndex") or 0)}
            try:
                registered = _call(
                    self._api.job,
                    f"register job {job_id}",
                    job_id,
                    method="post",
                    json=body,
                    params={"namespace": namespace},
                ).json()
            except NomadError as exc:
                if attempt == 1 and "Enforcing job modify index" in exc.message:
                    continue  # the job changed since the plan: look again (who owns it now?)
                raise _job_error(exc, namespace) from None
            break
        self._remember(namespace, job_id, meta)
        unchanged = (plan.get("Diff") or {}).get("Type") == "None"
        version = 0 if existing is None else int(existing.get("Version") or 0) + (0 if unchanged else 1)
        eval_id: str | None = registered.get("EvalID") or None
        evaluation, alloc_ids = self._placed(namespace, job_id, eval_id) if eval_id else (None, [])
        return SubmitResult(job_id, namespace, version, eval_id, alloc_ids), evaluation

    def _placed(self, namespace: str, job_id: str, eval_id: str) -> tuple[dict[str, Any] | None, list[str]]:
        """The job's evaluation once Nomad processed it, and the allocations it placed. The job is registered by
        then: a read that fails does not fail the submit (the event stream reports what becomes of the job)."""
        evaluation: dict[str, Any] | None = None
        try:
            evaluation = self._wait_eval(namespace, eval_id)
            if evaluation is None or evaluation.get("Status") == "pending":
                return evaluation, []
            stubs = _call(
                self._api.evaluation,
                f"allocations of evaluation {eval_id}",
                eval_id,
                "allocations",
                params={"namespace": namespace},
            ).json()
        except (NomadError, ValueError) as exc:
            log.warning(
                "job %s/%s is registered (evaluation %s), but reading what Nomad placed failed: %s; its status "
                "comes from Nomad's event stream",
                namespace,
                job_id,
                eval_id,
                exc,
            )
            return evaluation, []
        return evaluation, [a["ID"] for a in stubs or []]

    def _ensure_namespace(self, namespace: str, customer_id: str) -> None:
        if namespace in self._namespaces:
            return
        try:
            _call(self._api.namespace, f"namespace {namespace}", namespace)
        except NomadError as exc:
            if exc.status != 404:
                raise
            spec = {
                "Name": namespace,
                "Description": f"Caravan customer {customer_id}: its agents' jobs, allocations and variables",
                "Meta": {"caravan_owner": self._install_id, "caravan_customer": customer_id},
            }
            try:
                _call(self._ns_api.namespace, f"create namespace {namespace}", namespace, method="post", json=spec)
            except NomadError as create:
                if create.status == 403:
                    raise SchedulerError(
                        f"Nomad refused to create namespace {namespace!r} ({create.message}): creating namespaces "
                        f"needs a management token (CARAVAN_NOMAD_NAMESPACE_TOKEN), or create it first with "
                        f"`nomad namespace apply -description 'Caravan customer {customer_id}' {namespace}`"
                    ) from None
                raise
            log.info("created Nomad namespace %s", namespace)
        self._namespaces.add(namespace)

    def _get_job(self, namespace: str, job_id: str) -> dict[str, Any] | None:
        try:
            job: dict[str, Any] = _call(
                self._api.job, f"read job {job_id}", job_id, params={"namespace": namespace}
            ).json()
        except NomadError as exc:
            if exc.status == 404:
                return None
            raise
        return job

    def _plan(self, job: dict[str, Any], namespace: str, job_id: str) -> dict[str, Any]:
        try:
            plan: dict[str, Any] = _call(
                self._api.job,
                f"plan job {job_id}",
                job_id,
                "plan",
                method="post",
                json={"Job": job, "Diff": True},
                params={"namespace": namespace},
            ).json()
        except NomadError as exc:
            raise _job_error(exc, namespace) from None
        return plan

    def _put_secrets(self, namespace: str, job_id: str, secrets: Mapping[str, str]) -> None:
        """The job's secrets (its model's key, its NATS credentials, the flag store's token) in its Variable. Written
        at every submit: another control-plane replica may have removed it (stopping the job) meanwhile."""
        path = secrets_variable_path(job_id)
        items = {**secrets, SECRETS_MARKER: "nomad-variable"}
        body = {"Namespace": namespace, "Path": path, "Items": items}
        try:
            _call(
                self._api.variable,
                f"write variable {path}",
                path,
                method="put",
                json=body,
                params={"namespace": namespace},
            )
        except NomadError as exc:  # the message is Nomad's, never the items
            raise SchedulerError(f"could not store the job's secrets in Nomad: {exc}") from None

    def _wait_eval(self, namespace: str, eval_id: str) -> dict[str, Any] | None:
        """Follow the evaluation with blocking queries until the scheduler has processed it (or time is up)."""
        deadline = time.monotonic() + self._config.eval_wait_s
        index = 0
        evaluation: dict[str, Any] | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return evaluation
            wait = max(1, int(remaining + 0.999))
            response = _call(
                self._api.evaluation,
                f"evaluation {eval_id}",
                eval_id,
                params={"namespace": namespace, "index": index, "wait": f"{wait}s"},
                timeout=self._config.timeout_s + wait,
            )
            evaluation = response.json()
            if evaluation and evaluation.get("Status") != "pending":
                return evaluation
            # From 0 at each submit, for eval_wait_s at most: an index that went back meanwhile (a cluster rebuilt
            # behind the address) costs the rest of that wait, then the event stream reports the job.
            index = max(index + 1, int(response.headers.get("X-Nomad-Index") or 0))

    def _stop_job(self, namespace: str, job_id: str) -> None:
        job = self._get_job(namespace, job_id)
        if job is None:
            return
        self._check_owner(job.get("Meta") or {}, job_id)
        if not job.get("Stop"):
            _call(self._api.job, f"stop job {job_id}", job_id, method="delete", params={"namespace": namespace})
        path = secrets_variable_path(job_id)
        try:
            _call(self._api.variable, f"delete variable {path}", path, method="delete", params={"namespace": namespace})
        except NomadError as exc:
            if exc.status != 404:
                raise

    def _job_allocs(self, namespace: str, job_id: str) -> list[dict[str, Any]]:
        try:
            allocs: list[dict[str, Any]] = (
                _call(
                    self._api.job,
                    f"allocations of job {job_id}",
                    job_id,
                    "allocations",
                    params={"namespace": namespace},
                ).json()
                or []
            )
        except NomadError as exc:
            if exc.status == 404:
                return []
            raise
        return allocs

    def _alloc_stats(self, namespace: str, alloc_id: str) -> dict[str, Any] | None:
        try:
            usage = _call(
                self._api.client.allocation,
                f"stats of allocation {alloc_id}",
                alloc_id,
                "stats",
                params={"namespace": namespace},
            ).json()
        except NomadError as exc:
            log.debug("no statistics for allocation %s: %s", alloc_id, exc)  # it stopped in between
            return None
        resources = (usage or {}).get("ResourceUsage") or {}
        memory = resources.get("MemoryStats") or {}
        cpu = resources.get("CpuStats") or {}
        return {
            "alloc_id": alloc_id,
            "cpu_percent": round(float(cpu.get("Percent") or 0.0), 2),
            "memory_rss_mb": round(int(memory.get("RSS") or memory.get("Usage") or 0) / 2**20, 1),
        }

    # -- the event stream ------------------------------------------------------------------------------------

    def _follow(self) -> None:
        """Reader thread: keep one ``/v1/event/stream`` open and hand its lines to the loop; reconnect with
        back-off from the index of the last frame seen (:meth:`_follow_index`; heartbeats keep the read timeout from
        firing)."""
        backoff = RECONNECT_FIRST_S
        stream_api = self._config.client().event.stream
        while not self._closing.is_set():
            params = {
                "index": self._last_index + 1 if self._last_index else 0,
                "namespace": "*",
                "topic": [f"{topic}:*" for topic in EVENT_TOPICS],
            }
            steady = False
            try:
                response = _call(
                    stream_api,
                    "event stream",
                    method="get",
                    params=params,
                    stream=True,
                    timeout=(self._config.timeout_s, self._config.stream_read_timeout_s),
                    attempts=1,  # this loop tries again itself, with its own back-off, and stops when asked
                )
                self._stream = response
                with response:
                    self._feed.up()
                    self._post(_CONNECTED)
                    opened = time.monotonic()
                    for line in response.iter_lines():
                        if self._closing.is_set():
                            return
                        if line:
                            self._post(line)
                        if not steady and time.monotonic() - opened >= STEADY_STREAM_S:
                            steady = True
                            self._feed.steady()
                            backoff = RECONNECT_FIRST_S
                error, kind, status = STREAM_ENDED, "stream ended", None  # Nomad, or a proxy in front of it, ended it
            except (NomadError, requests.RequestException, OSError, ValueError, AttributeError) as exc:
                error, kind = _feed_error(exc), _feed_error_kind(exc)
                status = exc.status if isinstance(exc, NomadError) else None
            finally:
                self._stream = None
            if self._closing.is_set():
                return  # the stream was closed under us on purpose
            self._feed.down(error, kind, status, backoff)
            if self._closing.wait(backoff):
                return
            backoff = min(backoff * 2, RECONNECT_MOST_S)

    def _post(self, item: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def _consume(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if item is _CONNECTED:
                    await self._resync()
                    continue
                assert isinstance(item, bytes | str)
                frame = json.loads(item)
                if not frame:
                    continue  # heartbeat
                self._follow_index(int(frame.get("Index") or 0))
                for event in frame.get("Events") or []:
                    await self._on_event(event)
            except Exception:  # one odd frame must not end the status feed for good
                log.exception("could not handle a Nomad event")

    def _follow_index(self, index: int) -> None:
        """The index a reconnect goes on from: the latest frame's, even when it is lower than the one before (a
        cluster rebuilt behind the same address, or restored from a snapshot into fresh servers, counts from a
        lower index). Kept at the higher one, a reconnect would ask that cluster for an index ahead of every event
        it holds; Nomad then starts at its newest event (``StartAtClosest``), and of what happened while the stream
        was lost only that event and the allocations :meth:`_resync` reads again would reach us: not the jobs
        another replica started meanwhile, nor the evaluations that could not place a job."""
        if not index:
            return
        if index < self._last_index:
            log.info(
                "Nomad event stream: index %d is behind the %d seen before (a cluster rebuilt behind this address, "
                "or a server behind the one that answered before); following it",
                index,
                self._last_index,
            )
        self._last_index = index

    async def _resync(self) -> None:
        """After (re)connecting: events may have been missed; read the allocations of every job we track."""
        for namespace, job_id in list(self._jobs):
            for alloc in await asyncio.to_thread(self._job_allocs, namespace, job_id):
                await self._on_alloc(alloc)

    def _mark_foreign(self, key: tuple[str, str]) -> None:
        """Remember that a job is not ours (not to ask Nomad again), the newest ``FOREIGN_KEPT`` of them: the
        event stream of a busy cluster names new jobs for as long as the control plane runs."""
        self._foreign[key] = None
        if len(self._foreign) > FOREIGN_KEPT:
            del self._foreign[next(iter(self._foreign))]

    async def _tracked(self, namespace: str, job_id: str) -> _Tracked | None:
        key = (namespace, job_id)
        tracked = self._jobs.get(key)
        if tracked is not None or key in self._foreign:
            return tracked
        if not namespace.startswith("caravan-"):
            self._mark_foreign(key)
            return None
        job = await asyncio.to_thread(self._get_job, namespace, job_id)
        return self._remember(namespace, job_id, (job or {}).get("Meta") or {})

    async def _on_event(self, event: Mapping[str, Any]) -> None:
        topic, payload = event.get("Topic"), event.get("Payload") or {}
        if topic == "Allocation" and payload.get("Allocation"):
            await self._on_alloc(payload["Allocation"])
        elif topic == "Evaluation" and payload.get("Evaluation"):
            await self._on_evaluation(payload["Evaluation"])
        elif topic == "Job" and payload.get("Job"):
            job = payload["Job"]
            if event.get("Type") == "JobRegistered":
                self._remember(str(job.get("Namespace")), str(job.get("ID")), job.get("Meta") or {})
        elif topic == "Deployment" and payload.get("Deployment"):
            deployment = payload["Deployment"]
            if deployment.get("Status") == "failed" and self._jobs.get(
                (str(deployment.get("Namespace")), str(deployment.get("JobID")))
            ):
                log.warning(
                    "deployment of %s/%s version %s failed: %s",
                    deployment.get("Namespace"),
                    deployment.get("JobID"),
                    deployment.get("JobVersion"),
                    deployment.get("StatusDescription"),
                )

    async def _on_alloc(self, alloc: Mapping[str, Any]) -> None:
        if alloc.get("NextAllocation"):
            return  # superseded: its replacement reports from now on
        if alloc.get("DesiredStatus") in ("stop", "evict") and alloc.get("ClientStatus") in ("pending", "running"):
            return  # being stopped; it reports once it is
        namespace, job_id = str(alloc.get("Namespace")), str(alloc.get("JobID"))
        tracked = await self._tracked(namespace, job_id)
        if tracked is None:
            return
        state, reason = alloc_state(alloc)
        alloc_id = str(alloc["ID"])
        if self._allocs.get(alloc_id) == (state, reason):
            return
        self._allocs.pop(alloc_id, None)  # the newest at the end: the oldest go first
        self._allocs[alloc_id] = (state, reason)
        if len(self._allocs) > ALLOCS_KEPT:  # a repeat of a forgotten one is reported again, which is harmless
            del self._allocs[next(iter(self._allocs))]
        if state in (AllocState.PENDING, AllocState.STARTING, AllocState.RUNNING):
            tracked.placement = None
        await self._emit(StatusUpdate(namespace, job_id, alloc_id, state, reason, dict(tracked.meta)))

    async def _on_evaluation(self, evaluation: Mapping[str, Any]) -> None:
        failed = evaluation.get("FailedTGAllocs")
        if not failed or evaluation.get("Status") not in ("complete", "blocked"):
            return
        namespace, job_id = str(evaluation.get("Namespace")), str(evaluation.get("JobID"))
        tracked = await self._tracked(namespace, job_id)
        if tracked is None:
            return
        reason = "Nomad could not place the job: " + explain_placement(failed)
        if tracked.placement == reason:
            return
        tracked.placement = reason
        await self._emit(StatusUpdate(namespace, job_id, "", AllocState.FAILED, reason, dict(tracked.meta)))

    async def _emit(self, update: StatusUpdate) -> None:
        for callback in self._callbacks:
            try:
                await callback(update)
            except Exception:
                log.exception("status callback failed for %s", update.job_id)


def _job_error(exc: NomadError, namespace: str) -> Exception:
    """A job Nomad refuses (400, or a validation error it returns as 500) is :class:`JobRejected`; one refused for
    its namespace's not existing (:func:`_namespace_gone`) is :class:`_NamespaceGone`, holding that error."""
    error: SchedulerError = exc
    if exc.status == 400 or (exc.status == 500 and "error occurred" in exc.message):
        error = JobRejected(exc.message)
    elif exc.status == 403:
        error = SchedulerError(f"{exc} (the Nomad token lacks a capability; see nomad/caravan-policy.hcl)")
    return _NamespaceGone(error) if _namespace_gone(exc, namespace) else error


def _namespace_gone(exc: NomadError, namespace: str) -> bool:
    """Whether Nomad refused a job plan or register because ``namespace`` does not exist. Nomad answers 500, with
    ``job "<id>" is in nonexistent namespace "<namespace>"`` (the admission hook
    ``jobNamespaceConstraintCheckHook``, inside a ``1 error occurred:`` list, and the state store's
    ``upsertJobImpl``), or on Nomad Enterprise ``error in job mutator node-pool-mutation: namespace "<namespace>"
    not found`` (Go's ``%q``: a namespace name, ``[a-zA-Z0-9-]``, is quoted as is)."""
    quoted = f'"{namespace}"'
    return exc.status is not None and (
        f"nonexistent namespace {quoted}" in exc.message or f"namespace {quoted} not found" in exc.message
    )


class _NamespaceGone(Exception):
    """A job Nomad refused because its namespace no longer exists; ``error`` is how that refusal is reported if
    creating the namespace again does not mend it (:meth:`NomadScheduler._in_namespace`)."""

    def __init__(self, error: SchedulerError) -> None:
        super().__init__(str(error))
        self.error = error


class _FeedWatch:
    """The event stream's state, kept by the reader thread (the loop reads :attr:`state`, a frozen value replaced
    whole), and what the log says of it: a loss at WARNING (an end without error at INFO), each new error while it
    lasts at INFO (the same one again at DEBUG), once at ERROR when Nomad refuses the stream (4xx: trying again
    will not pass it) or it has been lost for :data:`LOST_ERROR_AFTER_S`, and its return at INFO once the stream
    is steady (:data:`STEADY_STREAM_S`): a connection that ends sooner did not end the loss."""

    def __init__(self) -> None:
        self.state = EventFeed(connected=False, since=utcnow())
        self._lost_at = time.monotonic()
        self._alarmed = False
        self._loss: EventFeed | None = None
        """The loss (a failed attempt at least) that a connection not yet steady may not have ended; None before the
        first failure and once a stream is steady."""
        self._back_after = 0.0

    def up(self) -> None:
        self._back_after = time.monotonic() - self._lost_at
        self.state = EventFeed(connected=True, since=utcnow())

    def steady(self) -> None:
        """The stream has stayed open :data:`STEADY_STREAM_S`: the loss is over."""
        loss, self._loss = self._loss, None
        if loss is not None:
            log.info(
                "Nomad event stream connected again after %.0fs (%d failed attempts): agents' statuses follow Nomad",
                self._back_after,
                loss.failures,
            )
        self._alarmed = False

    def down(self, error: str, kind: str, status: int | None, retry_in: float) -> None:
        """An attempt failed with ``error``, of the kind ``kind`` (:func:`_feed_error_kind`; Nomad's HTTP
        ``status``, if it answered), or a connected stream ended (:data:`STREAM_ENDED`); the next attempt is in
        ``retry_in`` seconds."""
        # a stream that ends before it is steady did not end the loss before it (if there was one)
        previous = self._loss if self._loss is not None else self.state
        if previous.connected:  # a steady stream ended: a new loss
            self._lost_at = time.monotonic()
        self._loss = self.state = EventFeed(
            connected=False,
            since=utcnow() if previous.connected else previous.since,
            last_error=error,
            last_error_kind=kind,
            failures=previous.failures + 1,
        )
        lost_for = time.monotonic() - self._lost_at
        refused = status is not None and 400 <= status < 500
        if not self._alarmed and (refused or lost_for >= LOST_ERROR_AFTER_S):
            self._alarmed = True
            if refused:
                hint = (
                    ' (the token needs read-job in a rule for namespace "*" itself: nomad/caravan-policy.hcl)'
                    if status in (401, 403)
                    else ""
                )
                log.error("Nomad refuses the event stream: %s%s; %s", error, hint, _STALE)
            else:
                log.error(
                    "Nomad event stream lost for %.0fs (%d attempts), last: %s; %s",
                    lost_for,
                    previous.failures + 1,
                    error,
                    _STALE,
                )
        elif not previous.failures:  # the first failure since it was connected (or since the start)
            level = logging.INFO if error == STREAM_ENDED else logging.WARNING
            log.log(level, "Nomad event stream lost: %s; reconnecting in %.1fs", error, retry_in)
        else:
            level = logging.DEBUG if error == previous.last_error else logging.INFO
            log.log(level, "Nomad event stream: %s; reconnecting in %.1fs", error, retry_in)


_POOL = re.compile(r"\b\w+\(host=[^)]*\):\s*")
_URL = re.compile(r"\b\w+://\S+|\bwith url: \S+\s*")
_CAUSE = re.compile(r"\(Caused by \w+\((.*)\)\)\s*$")


def _feed_error(exc: BaseException) -> str:
    """Why the event stream failed, on one line of at most 200 characters (for the log): Nomad's
    status and answer, or the network's reason without the request's URL or address (the token travels in a
    header and never shows)."""
    if isinstance(exc, NomadError):
        text = f"{exc.status} {exc.message}" if exc.status is not None else exc.message
    else:
        text = str(exc) or type(exc).__name__
    cause = _CAUSE.search(text)
    if cause:
        text = cause.group(1).strip("\"'")
    text = " ".join(_URL.sub("", _POOL.sub("", text)).split())
    return text if len(text) <= 200 else text[:199] + "…"


def _feed_error_kind(exc: BaseException) -> str:
    """What kind of failure ended an attempt to follow the event stream, in fixed words that name no address and
    quote no server (``/readyz`` shows them without authentication; :func:`_feed_error` says the rest, in the log):
    ``unauthorized (401)`` or ``(403)`` (the token), ``HTTP <status>`` (another answer from Nomad or a proxy in
    front of it), ``unreachable`` (no answer) or ``connection lost`` (an open stream broke off); a stream that ended
    without an error is ``stream ended``."""
    if isinstance(exc, NomadError):
        if exc.status in (401, 403):
            return f"unauthorized ({exc.status})"
        return "unreachable" if exc.status is None else f"HTTP {exc.status}"
    return "connection lost"


def _abort(response: requests.Response) -> None:
    """Unblock a thread reading ``response``: shut its socket down (closing alone does not wake a reader)."""
    raw = getattr(response.raw, "_fp", None)
    sock = getattr(getattr(raw, "fp", None), "raw", None)
    sock = getattr(sock, "_sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(2)
    response.close()
