"""A Nomad HTTP API double, built from Nomad's documented API (``developer.hashicorp.com/nomad/api-docs``) and
its ``api/`` structs, for the contract tests that also run against a real ``nomad agent -dev``.

It serves, on a random loopback port: jobs (read, plan with diff and placement metrics, register with
``EnforceIndex``, deregister, allocations, versions), evaluations (blocking queries with ``index``/``wait`` and
``X-Nomad-Index``), allocations, client allocation stats, namespaces (created, read, deleted), variables,
``/v1/status/leader`` and ``/v1/event/stream`` (ndjson frames ``{"Index", "Events": [...]}`` and ``{}``
heartbeats). Errors are plain text with Nomad's status codes: 400 for a request it cannot decode, 403
``Permission denied`` when ACLs are on and the token lacks the capability, 404, and 500 for a job that fails
validation or is in a namespace that does not exist (``1 error occurred: ...``).

The cluster is scriptable: nodes with CPU/memory/drivers/attributes, so that placement fails with
``FailedTGAllocs`` (``DimensionExhausted``, ``ConstraintFiltered``) and leaves a blocked evaluation; allocations
that go pending → running; tasks that crash and are restarted per the group's restart policy until Nomad
stops restarting them; and rolling deployments that are health-checked and auto-revert to the last stable
version. Task behaviour comes from :meth:`NomadDouble.set_behaviour`, from a ``# nomad-double: crash exit=3``
annotation in the task's command line, or from a command that does not exist (a driver failure). Delays of
the job (restart delay, min healthy time, healthy deadline) run ``time_scale`` times faster. Routes fail on
demand (:meth:`NomadDouble.failing`), as they do while Nomad has no leader; the event stream too, and an open one
then ends. A cluster rebuilt behind the same address (its index lower than before) is :meth:`NomadDouble.rebuild`.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import heapq
import itertools
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["Crash", "DriverFailure", "Healthy", "Node", "NomadDouble", "Policy", "Unhealthy"]

NS = 1_000_000_000


@dataclass(frozen=True)
class Healthy:
    """The task starts, runs, and passes its health checks."""


@dataclass(frozen=True)
class Unhealthy:
    """The task runs but its health checks never pass."""


@dataclass(frozen=True)
class Crash:
    """The task exits with ``exit_code`` shortly after each start."""

    exit_code: int = 1
    message: str = ""


@dataclass(frozen=True)
class DriverFailure:
    """The driver cannot start the task."""

    error: str


Behaviour = Healthy | Unhealthy | Crash | DriverFailure


@dataclass
class Node:
    name: str
    cpu: int = 4000
    memory_mb: int = 8192
    datacenter: str = "dc1"
    drivers: tuple[str, ...] = ("raw_exec", "exec", "docker")
    attributes: dict[str, str] = field(default_factory=lambda: {"kernel.name": "linux", "cpu.arch": "amd64"})
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class Policy:
    """An ACL token's rights: capabilities per namespace glob, variable capabilities per path glob."""

    namespaces: dict[str, set[str]] = field(default_factory=dict)
    variables: dict[str, set[str]] = field(default_factory=dict)
    management: bool = False

    def allows(self, namespace: str, capability: str) -> bool:
        """Nomad's ``AllowNamespaceOperation`` (``acl/acl.go``): the namespace's own rule, else the closest glob
        that matches it; ``*`` (all namespaces, as a job list asks) is allowed if any rule grants the capability."""
        if self.management:
            return True
        if namespace == "*" and any(capability in caps for caps in self.namespaces.values()):
            return True
        return capability in self._rule(namespace)

    def allows_stream_of_all_namespaces(self, capability: str) -> bool:
        """The event stream of every namespace (``namespace=*``) asks more: a rule written for ``*`` itself
        (Nomad's events API docs; hashicorp/nomad#25089, where any namespace's ``read-job`` let a token follow them
        all)."""
        return self.management or capability in self._rule("*")

    def _rule(self, namespace: str) -> set[str]:
        if namespace in self.namespaces:
            return self.namespaces[namespace]
        globs = [g for g in self.namespaces if "*" in g and fnmatch.fnmatchcase(namespace, g)]
        if not globs:
            return set()
        # findClosestMatchingGlob: the fewest characters of the namespace left to the glob's wildcards
        return self.namespaces[min(globs, key=lambda g: len(namespace) - len(g) + g.count("*"))]

    def allows_variable(self, namespace: str, path: str, capability: str) -> bool:
        if self.management:
            return True
        if not any(fnmatch.fnmatchcase(namespace, glob) for glob in self.namespaces):
            return False
        return any(fnmatch.fnmatchcase(path, glob) and capability in caps for glob, caps in self.variables.items())


class HttpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def go_duration(ns: int) -> str:
    """Go's ``time.Duration.String()``: ``100ms``, ``30s``, ``5m0s``, ``1h0m0s``."""
    if ns == 0:
        return "0s"
    if ns < NS:
        return f"{ns // 1_000_000}ms"
    seconds = ns // NS
    if seconds < 60:
        return f"{ns / NS:g}s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


def _validation_error(errors: list[str]) -> HttpError:
    noun = "error" if len(errors) == 1 else "errors"
    body = "".join(f"\t* {e}\n" for e in errors)
    return HttpError(500, f"{len(errors)} {noun} occurred:\n{body}\n")


_TYPES = {"Count": int, "Priority": int, "CPU": int, "MemoryMB": int, "KillTimeout": int}


def _check_types(value: Any, path: str = "Job") -> None:
    """Go's decoder refuses a value of the wrong JSON type (but silently drops unknown keys)."""
    if isinstance(value, dict):
        for key, item in value.items():
            want = _TYPES.get(key)
            if want is not None and item is not None and (not isinstance(item, want) or isinstance(item, bool)):
                raise HttpError(
                    400, f"json: cannot unmarshal {type(item).__name__} into Go struct field {path}.{key} of type int"
                )
            if key not in ("Meta", "Env", "Config"):
                _check_types(item, f"{path}.{key}")
    elif isinstance(value, list):
        for item in value:
            _check_types(item, path)


def _group_problems(group: dict[str, Any]) -> list[str]:
    """``RestartPolicy.Validate`` (mode, attempts, interval at least 5 s, attempts times delay within it) and
    ``ServiceCheck`` validation (an http or tcp check's interval and timeout at least 1 s)."""
    problems = []
    policy = group.get("RestartPolicy")
    if policy is not None:
        mode, attempts = policy.get("Mode"), policy.get("Attempts") or 0
        interval, delay = policy.get("Interval") or 0, policy.get("Delay") or 0
        if mode not in ("delay", "fail"):
            problems.append(f"Unsupported restart mode: {mode!r}")
        if attempts == 0 and mode != "fail":
            problems.append(f"Restart policy {mode!r} with {attempts} attempts is ambiguous")
        if interval < 5_000_000_000:
            problems.append(f"Interval can not be less than 5s (got {go_duration(interval)})")
        if attempts * delay > interval:
            problems.append(
                f"Nomad can't restart the TaskGroup {attempts} times in an interval of {go_duration(interval)} "
                f"with a delay of {go_duration(delay)}"
            )
    for service in group.get("Services") or []:
        for check in service.get("Checks") or []:
            if check.get("Type") not in ("http", "tcp"):
                continue
            where = f"Service {service.get('Name')} validation failed: check {check.get('Name')!r} invalid"
            interval, timeout = check.get("Interval") or 0, check.get("Timeout") or 0
            if interval < 1_000_000_000:
                problems.append(f"{where}: interval ({go_duration(interval)}) cannot be lower than 1s")
            if timeout < 1_000_000_000:
                problems.append(f"{where}: timeout ({go_duration(timeout)}) is lower than required minimum timeout 1s")
    return problems


@dataclass
class _Fault:
    """How requests to a route fail (:meth:`NomadDouble.failing`): ``times_left`` more of them (None: all), only
    those for ``job`` (None: any)."""

    code: int
    message: str
    times_left: int | None
    job: str | None


class NomadDouble:
    """``with NomadDouble() as nomad: nomad.address``; the cluster's state is inspectable for tests."""

    def __init__(
        self,
        nodes: list[Node] | None = None,
        tokens: dict[str, Policy] | None = None,
        time_scale: float = 0.02,
        heartbeat_s: float = 10.0,
        event_buffer: int = 20_000,
    ) -> None:
        self.nodes = nodes if nodes is not None else [Node("client-1")]
        self.tokens = tokens
        self.time_scale = time_scale
        self.heartbeat_s = heartbeat_s
        self.index = 1
        self.cond = threading.Condition()
        self.namespaces: dict[str, dict[str, Any]] = {
            "default": {"Name": "default", "Description": "Default shared namespace", "Meta": None}
        }
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.versions: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.evals: dict[str, dict[str, Any]] = {}
        self.allocs: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.variables: dict[tuple[str, str], dict[str, Any]] = {}
        self.behaviours: dict[str, Behaviour] = {}
        self.requests: list[tuple[str, str, bytes]] = []
        self.held = 0  # blocking queries waiting now for the index to pass theirs
        self.faults: dict[str, _Fault] = {}  # routes (by handler) that fail (failing)
        self.cut_streams = False  # a proxy in front ends every event stream once its headers are sent (and open ones)
        self.break_streams = False  # the connection of every event stream breaks off in the middle of a frame
        self.events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=event_buffer)
        self.generation = 0  # of the event broker: a rebuilt cluster has a new one (rebuild)
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._closing = False
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        assert self._server is not None, "double not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> NomadDouble:
        double = self

        class Handler(_Handler):
            nomad = double

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        for target, name in ((self._server.serve_forever, "nomad-double-http"), (self._clock, "nomad-double-clock")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def wait_held(self, count: int = 1, timeout: float = 30) -> None:
        """Return once ``count`` blocking queries are held (they arrived, and the index has not passed theirs)."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.held >= count, timeout=timeout):
                raise TimeoutError(f"{self.held} blocking queries held, not {count}, after {timeout}s")

    @contextlib.contextmanager
    def failing(
        self,
        *handlers: str,
        code: int = 500,
        message: str = "No cluster leader",
        times: int | None = None,
        job: str | None = None,
    ) -> Iterator[None]:
        """Inside the block, requests to these routes (named by their handler in ``_ROUTES``: ``eval_get``,
        ``eval_allocs``...) fail as Nomad answers them when it has lost its leader; the others are served.
        ``times``: only the first this many requests to each of them fail (a leader elected meanwhile). ``job``:
        only the requests for this job ID (in the route's path, as ``/v1/job/:id``) fail. The event stream
        (``events``) fails so too, and an open one ends: Nomad closes the subscriptions of a token that is deleted
        or whose policy no longer allows them (then answers 403), and a proxy cuts a long request."""
        unknown = set(handlers) - {handler for _, _, handler in _ROUTES}
        if unknown:
            raise ValueError(f"no such route: {', '.join(sorted(unknown))}")
        with self.cond:
            self.faults.update({handler: _Fault(code, message, times, job) for handler in handlers})
            self.cond.notify_all()  # open streams look
        try:
            yield
        finally:
            with self.cond:
                for handler in handlers:
                    self.faults.pop(handler, None)

    def fails(self, handler: str, job_id: str | None = None) -> bool:
        """Whether the next request to this route (for this job, if it names one) fails (:meth:`failing`); lock
        held."""
        fault = self.faults.get(handler)
        return fault is not None and fault.times_left != 0 and fault.job in (None, job_id)

    def rebuild(self, index: int) -> None:
        """Look as the cluster at this address does to its clients once it was rebuilt, or a snapshot restored into
        fresh servers (hashicorp/raft's ``Restore`` then takes the snapshot's index + 1, behind the index the old
        cluster had reached): its raft index goes back to ``index``, its event buffer starts empty (the new state
        store has a new event broker) and the event streams open end (Nomad abandons the old state store, stopping
        its broker: ``StateStore.Abandon``). The double keeps its jobs, evaluations and allocations as they are,
        with their own indexes (a restore would set them back to the snapshot's)."""
        with self.cond:
            if index >= self.index:
                raise ValueError(f"index {index} is not behind the cluster's, {self.index}")
            self.index = index
            self.events.clear()
            self.generation += 1
            self.cond.notify_all()

    def stream_start(self, index: int) -> int:
        """The index of the first frame an event stream asked to start at ``index`` sends, as Nomad's event broker
        picks it (``eventBuffer.StartAtClosest``, ``nomad/stream/event_buffer.go``): 0, the whole buffer; else the
        first buffered frame at or after ``index``, or, when ``index`` is ahead of every buffered frame, the newest
        one. The stream then sends every frame after that one, whatever its index: none is skipped for being lower
        than ``index``. Lock held."""
        if index <= 0:
            return 0
        buffered = [i for i, _ in self.events]
        if not buffered:
            return self.index + 1  # an empty buffer: what comes next
        return next((i for i in buffered if i >= index), buffered[-1])

    def set_behaviour(self, job_id: str, behaviour: Behaviour) -> None:
        with self.cond:
            self.behaviours[job_id] = behaviour

    def job_allocs(self, namespace: str, job_id: str) -> list[dict[str, Any]]:
        with self.cond:
            return [
                copy.deepcopy(a) for a in self.allocs.values() if (a["Namespace"], a["JobID"]) == (namespace, job_id)
            ]

    # -- the clock: delayed transitions ----------------------------------------------------------------------

    def _after(self, seconds: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + seconds * self.time_scale, next(self._seq), action))
        self.cond.notify_all()

    def _clock(self) -> None:
        with self.cond:
            while not self._closing:
                now = time.monotonic()
                if self._timers and self._timers[0][0] <= now:
                    _, _, action = heapq.heappop(self._timers)
                    action()
                    continue
                self.cond.wait(timeout=(self._timers[0][0] - now) if self._timers else 1.0)

    # -- state changes (called with the lock held) -----------------------------------------------------------

    def _bump(self) -> int:
        self.index += 1
        self.cond.notify_all()
        return self.index

    def _publish(self, topic: str, kind: str, key: str, namespace: str, payload: dict[str, Any], *keys: str) -> None:
        index = self.index
        event = {
            "Topic": topic,
            "Type": kind,
            "Key": key,
            "Namespace": namespace,
            "FilterKeys": [k for k in keys if k] or None,
            "Index": index,
            "Payload": payload,
        }
        self.events.append((index, event))
        self.cond.notify_all()

    def _save_alloc(self, alloc: dict[str, Any], kind: str = "AllocationUpdated") -> None:
        now = time.time_ns()
        alloc["ModifyIndex"] = alloc["AllocModifyIndex"] = self._bump()
        alloc["ModifyTime"] = now
        self.allocs[alloc["ID"]] = alloc
        stripped = {k: v for k, v in _public(alloc).items() if k != "Job"}  # Nomad drops the job from alloc events
        self._publish(
            "Allocation",
            kind,
            alloc["ID"],
            alloc["Namespace"],
            {"Allocation": copy.deepcopy(stripped)},
            alloc["JobID"],
            alloc["DeploymentID"],
            alloc["EvalID"],
        )

    def _save_eval(self, evaluation: dict[str, Any]) -> None:
        evaluation["ModifyIndex"] = self._bump()
        if evaluation["ID"] not in self.evals:  # written once: created and modified at the same index, as in Nomad
            evaluation["CreateIndex"] = evaluation["ModifyIndex"]
        evaluation["ModifyTime"] = time.time_ns()
        self.evals[evaluation["ID"]] = evaluation
        self._publish(
            "Evaluation",
            "EvaluationUpdated",
            evaluation["ID"],
            evaluation["Namespace"],
            {"Evaluation": copy.deepcopy(evaluation)},
            evaluation["JobID"],
            evaluation.get("DeploymentID", ""),
        )

    def _save_deployment(self, deployment: dict[str, Any]) -> None:
        deployment["ModifyIndex"] = self._bump()
        self.deployments[deployment["ID"]] = deployment
        self._publish(
            "Deployment",
            "DeploymentStatusUpdate",
            deployment["ID"],
            deployment["Namespace"],
            {"Deployment": copy.deepcopy(deployment)},
            deployment["JobID"],
        )

    # -- jobs ------------------------------------------------------------------------------------------------

    def validate_job(self, job: dict[str, Any], namespace: str) -> None:
        """What Nomad's admission validators refuse of what Caravan writes, as the job plan and register endpoints
        run them (``nomad/job_endpoint_hooks.go``: every validator's errors in one list, 500): the namespace's
        existing (``jobNamespaceConstraintCheckHook``, before ``jobValidate``), then ``Job.Validate``
        (``nomad/structs``: the job, its groups' restart policies, their services' checks, their tasks' resources)."""
        errors = []
        if namespace not in self.namespaces:
            errors.append(f'job "{job["ID"]}" is in nonexistent namespace "{namespace}"')
        if not job.get("Datacenters"):
            errors.append("Missing job datacenters")
        if job.get("Type", "service") not in ("service", "batch", "system", "sysbatch"):
            errors.append(f"Invalid job type: {job.get('Type')!r}")
        groups = job.get("TaskGroups") or []
        if not groups:
            errors.append("Missing job task groups")
        for group in groups:
            name = group.get("Name") or "<unnamed>"
            if (group.get("Count") or 0) < 0:
                errors.append(f"Task group {name} validation failed: Task group count can't be negative")
            if not group.get("Tasks"):
                errors.append(f"Task group {name} validation failed: Missing tasks for task group")
            errors.extend(f"Task group {name} validation failed: {p}" for p in _group_problems(group))
            for task in group.get("Tasks") or []:
                task_errors = []
                if not task.get("Driver"):
                    task_errors.append("Missing task driver")
                resources = task.get("Resources") or {}
                if resources.get("CPU") is not None and resources["CPU"] < 1:
                    task_errors.append(f"minimum CPU value is 1; got {resources['CPU']}")
                if resources.get("MemoryMB") is not None and resources["MemoryMB"] < 10:
                    task_errors.append(f"minimum MemoryMB value is 10; got {resources['MemoryMB']}")
                for problem in task_errors:
                    errors.append(
                        f"Task group {name} validation failed: Task {task.get('Name')} validation failed: {problem}"
                    )
        if errors:
            raise _validation_error(errors)

    def _behaviour(self, job: dict[str, Any], task: dict[str, Any]) -> Behaviour:
        if job["ID"] in self.behaviours:
            return self.behaviours[job["ID"]]
        config = task.get("Config") or {}
        line = " ".join([str(config.get("command", ""))] + [str(a) for a in config.get("args") or []])
        marked = re.search(r"# nomad-double: (\w+)((?: \w+=\S+)*)", line)
        if marked:
            options = dict(o.split("=", 1) for o in marked.group(2).split())
            kind = marked.group(1)
            if kind == "crash":
                return Crash(int(options.get("exit", "1")), options.get("message", "").replace("_", " "))
            return Unhealthy() if kind == "unhealthy" else Healthy()
        command = str(config.get("command", ""))
        if task.get("Driver") in ("raw_exec", "exec") and command:
            if (os.path.isabs(command) and not os.path.exists(command)) or (
                not os.path.isabs(command) and not shutil.which(command)
            ):
                return DriverFailure(
                    f'failed to launch command with executor: rpc error: code = Unknown desc = exec: "{command}": '
                    f"stat {command}: no such file or directory"
                )
            if os.path.basename(command) == "false":
                return Crash(1)
        return Healthy()

    def register(self, job: dict[str, Any], namespace: str, enforce: int | None) -> dict[str, Any]:
        key = (namespace, job["ID"])
        existing = self.jobs.get(key)
        if enforce is not None:
            if existing is not None and enforce == 0:
                raise HttpError(500, "Enforcing job modify index 0: job already exists")
            if existing is not None and enforce != existing["JobModifyIndex"]:
                raise HttpError(
                    500,
                    f"Enforcing job modify index {enforce}: job exists with conflicting job modify index: "
                    f"{existing['JobModifyIndex']}",
                )
            if existing is None and enforce != 0:
                raise HttpError(500, f"Enforcing job modify index {enforce}: job does not exist")
        job = self._canonical(job, namespace)
        changed = existing is None or existing.get("Stop") or _spec(existing) != _spec(job)
        if changed:
            self._store_job(job, existing)
        else:
            job = existing  # type: ignore[assignment]
        evaluation = self._new_eval(job, "job-register")
        self._save_eval(evaluation)
        self._after(0.05 / self.time_scale, lambda: self._process(evaluation["ID"]))
        return {
            "EvalID": evaluation["ID"],
            "EvalCreateIndex": evaluation["CreateIndex"],
            "JobModifyIndex": self.jobs[key]["JobModifyIndex"],
            "Warnings": "",
            "Index": self.index,
        }

    def _canonical(self, job: dict[str, Any], namespace: str) -> dict[str, Any]:
        job = copy.deepcopy(job)
        job["Namespace"] = namespace
        job.setdefault("Type", "service")
        job.setdefault("Priority", 50)
        job.setdefault("Region", "global")
        job["Stop"] = False
        for group in job["TaskGroups"]:
            group.setdefault("Count", 1)
        return job

    def _store_job(self, job: dict[str, Any], existing: dict[str, Any] | None) -> None:
        key = (job["Namespace"], job["ID"])
        index = self._bump()
        job["Version"] = 0 if existing is None else existing["Version"] + 1
        job["CreateIndex"] = index if existing is None else existing["CreateIndex"]
        job["JobModifyIndex"] = job["ModifyIndex"] = index
        job["Stable"] = False
        job["Status"] = "pending"
        job["SubmitTime"] = time.time_ns()
        self.jobs[key] = job
        self.versions.setdefault(key, []).insert(0, copy.deepcopy(job))
        self._publish("Job", "JobRegistered", job["ID"], job["Namespace"], {"Job": copy.deepcopy(job)})

    def _new_eval(self, job: dict[str, Any], trigger: str, status: str = "pending") -> dict[str, Any]:
        now = time.time_ns()
        return {
            "ID": str(uuid.uuid4()),
            "Namespace": job["Namespace"],
            "Priority": job.get("Priority", 50),
            "Type": job.get("Type", "service"),
            "TriggeredBy": trigger,
            "JobID": job["ID"],
            "JobModifyIndex": job["JobModifyIndex"],
            "Status": status,
            "StatusDescription": "",
            "DeploymentID": "",
            "BlockedEval": "",
            "PreviousEval": "",
            "NextEval": "",
            "FailedTGAllocs": None,
            "QueuedAllocations": None,
            "CreateIndex": self.index,
            "ModifyIndex": self.index,
            "CreateTime": now,
            "ModifyTime": now,
        }

    def deregister(self, namespace: str, job_id: str, purge: bool) -> dict[str, Any]:
        job = self.jobs.get((namespace, job_id))
        if job is None:
            raise HttpError(404, "job not found")
        stopping = not purge and not job.get("Stop")  # a stop is a version of its own, with Stop set (`job history`
        if stopping:  # lists it); a purge removes the job with its versions
            job.update(Version=job["Version"] + 1, Stable=False, SubmitTime=time.time_ns())
        job["Stop"] = True
        job["JobModifyIndex"] = job["ModifyIndex"] = self._bump()
        job["Status"] = "dead"
        if stopping:
            self.versions[(namespace, job_id)].insert(0, copy.deepcopy(job))
        self._publish("Job", "JobDeregistered", job_id, namespace, {"Job": copy.deepcopy(job)})
        evaluation = self._new_eval(job, "job-deregister")
        for alloc in list(self.allocs.values()):
            if (alloc["Namespace"], alloc["JobID"]) == (namespace, job_id) and alloc["DesiredStatus"] == "run":
                self._stop_alloc(alloc, "alloc not needed since job was stopped")
        evaluation["Status"] = "complete"
        self._save_eval(evaluation)
        if purge:
            del self.jobs[(namespace, job_id)]
            del self.versions[(namespace, job_id)]
        self._retry_blocked()
        return {
            "EvalID": evaluation["ID"],
            "EvalCreateIndex": evaluation["CreateIndex"],
            "JobModifyIndex": job["JobModifyIndex"],
            "Index": self.index,
        }

    # -- scheduling ------------------------------------------------------------------------------------------

    def _used(self, node: Node) -> tuple[int, int]:
        cpu = mem = 0
        for alloc in self.allocs.values():
            if (
                alloc["NodeID"] == node.id
                and alloc["DesiredStatus"] == "run"
                and alloc["ClientStatus"] in ("pending", "running")
            ):
                cpu += alloc["_cpu"]
                mem += alloc["_mem"]
        return cpu, mem

    def _place(
        self,
        job: dict[str, Any],
        group: dict[str, Any],
        count: int,
    ) -> tuple[list[Node], dict[str, Any] | None]:
        """Pick a node for each of ``count`` new allocations; the AllocationMetric of those that did not fit."""
        task = group["Tasks"][0]
        cpu = int((task.get("Resources") or {}).get("CPU") or 100)
        mem = int((task.get("Resources") or {}).get("MemoryMB") or 300)
        usage = {node.id: list(self._used(node)) for node in self.nodes}
        placed: list[Node] = []
        metric: dict[str, Any] | None = None
        failures = 0
        for _ in range(count):
            m: dict[str, Any] = {
                "NodesEvaluated": 0,
                "NodesFiltered": 0,
                "NodesInPool": len(self.nodes),
                "NodePool": "default",
                "NodesAvailable": {},
                "ClassFiltered": None,
                "ConstraintFiltered": None,
                "NodesExhausted": 0,
                "ClassExhausted": None,
                "DimensionExhausted": None,
                "QuotaExhausted": None,
                "ResourcesExhausted": None,
                "Scores": None,
                "AllocationTime": 12345,
                "CoalescedFailures": 0,
                "ScoreMetaData": None,
            }
            chosen = None
            for node in self.nodes:
                if not any(fnmatch.fnmatchcase(node.datacenter, dc) for dc in job.get("Datacenters") or []):
                    continue
                m["NodesAvailable"][node.datacenter] = m["NodesAvailable"].get(node.datacenter, 0) + 1
                m["NodesEvaluated"] += 1
                unmet = self._unmet_constraint(job, group, task, node)
                if unmet:
                    m["NodesFiltered"] += 1
                    m["ConstraintFiltered"] = m["ConstraintFiltered"] or {}
                    m["ConstraintFiltered"][unmet] = m["ConstraintFiltered"].get(unmet, 0) + 1
                    continue
                used_cpu, used_mem = usage[node.id]
                short = "cpu" if used_cpu + cpu > node.cpu else "memory" if used_mem + mem > node.memory_mb else None
                if short:
                    m["NodesExhausted"] += 1
                    m["DimensionExhausted"] = m["DimensionExhausted"] or {}
                    m["DimensionExhausted"][short] = m["DimensionExhausted"].get(short, 0) + 1
                    m["ResourcesExhausted"] = {task["Name"]: {"CPU": cpu, "MemoryMB": mem}}
                    continue
                chosen = node
                break
            if chosen is None:
                failures += 1
                metric = metric or m
                continue
            usage[chosen.id][0] += cpu
            usage[chosen.id][1] += mem
            placed.append(chosen)
        if metric is not None:
            metric["CoalescedFailures"] = failures - 1
        return placed, metric

    @staticmethod
    def _unmet_constraint(job: dict[str, Any], group: dict[str, Any], task: dict[str, Any], node: Node) -> str | None:
        if task.get("Driver") not in node.drivers:
            return "missing drivers"
        for constraint in (
            (job.get("Constraints") or []) + (group.get("Constraints") or []) + (task.get("Constraints") or [])
        ):
            target = str(constraint.get("LTarget", ""))
            attr = re.fullmatch(r"\$\{(?:attr|node)\.(.+)\}", target)
            value = node.attributes.get(attr.group(1)) if attr else target
            operand, wanted = constraint.get("Operand") or "=", str(constraint.get("RTarget", ""))
            ok = (
                (value == wanted)
                if operand in ("=", "==", "is")
                else (value != wanted)
                if operand in ("!=", "not")
                else True
            )
            if not ok:
                return f"{target} {operand} {wanted}"
        return None

    def plan(self, job: dict[str, Any], namespace: str) -> dict[str, Any]:
        key = (namespace, job["ID"])
        existing = self.jobs.get(key)
        job = self._canonical(job, namespace)
        diff_type = (
            "Added"
            if existing is None
            else "None"
            if (not existing.get("Stop") and _spec(existing) == _spec(job))
            else "Edited"
        )
        updates: dict[str, Any] = {}
        failed: dict[str, Any] = {}
        for group in job["TaskGroups"]:
            running = [a for a in self._current_allocs(namespace, job["ID"]) if a["TaskGroup"] == group["Name"]]
            desired = group["Count"]
            destructive = (
                diff_type == "Edited"
                and existing is not None
                and _group_spec(existing, group["Name"]) != _group_spec(job, group["Name"])
            )
            place = max(0, desired - len(running))
            update = {
                "Place": place,
                "Stop": max(0, len(running) - desired),
                "Ignore": 0 if destructive else min(desired, len(running)),
                "InPlaceUpdate": 0,
                "DestructiveUpdate": min(desired, len(running)) if destructive else 0,
                "Migrate": 0,
                "Canary": 0,
                "Preemptions": 0,
            }
            updates[group["Name"]] = update
            if place:
                _, metric = self._place(job, group, place)
                if metric is not None:
                    failed[group["Name"]] = metric
        return {
            "Index": 0,
            "JobModifyIndex": existing["JobModifyIndex"] if existing else 0,
            "Annotations": {"DesiredTGUpdates": updates, "PreemptedAllocs": None},
            "FailedTGAllocs": failed or None,
            "CreatedEvals": None,
            "Warnings": "",
            "Diff": {"Type": diff_type, "ID": job["ID"], "Fields": None, "Objects": None, "TaskGroups": None},
            "NextPeriodicLaunch": "0001-01-01T00:00:00Z",
        }

    def _current_allocs(self, namespace: str, job_id: str) -> list[dict[str, Any]]:
        return [
            a
            for a in self.allocs.values()
            if (a["Namespace"], a["JobID"]) == (namespace, job_id)
            and a["DesiredStatus"] == "run"
            and a["ClientStatus"] in ("pending", "running")
        ]

    def _process(self, eval_id: str) -> None:
        evaluation = self.evals[eval_id]
        key = (evaluation["Namespace"], evaluation["JobID"])
        job = self.jobs.get(key)
        if job is None or job.get("Stop") or evaluation["Status"] not in ("pending", "blocked"):
            return
        failed: dict[str, Any] = {}
        deployment = None
        for group in job["TaskGroups"]:
            current = [a for a in self._current_allocs(*key) if a["TaskGroup"] == group["Name"]]
            stale = [a for a in current if a["JobVersion"] != job["Version"]]
            fresh = [a for a in current if a["JobVersion"] == job["Version"]]
            if stale and _group_spec(job, group["Name"]) == _group_spec(
                self._version(key, stale[0]["JobVersion"]), group["Name"]
            ):
                for alloc in stale:  # only the count changed: keep them, in place
                    alloc["JobVersion"] = job["Version"]
                fresh, stale = fresh + stale, []
            for alloc in fresh[group["Count"] :]:
                self._stop_alloc(alloc, "alloc not needed due to job update")
            fresh = fresh[: group["Count"]]
            wanted = group["Count"] - len(fresh)
            rolling = bool(stale) and (job.get("Update") or {}).get("MaxParallel", 0) > 0
            if rolling or (
                wanted and evaluation["TriggeredBy"] == "job-register" and (job.get("Update") or {}).get("MaxParallel")
            ):
                deployment = deployment or self._new_deployment(job, group)
            batch = wanted
            if rolling:
                batch = min(wanted, (job.get("Update") or {}).get("MaxParallel") or wanted)
                for alloc in stale[:batch]:
                    self._stop_alloc(alloc, "alloc is being updated due to job update")
            nodes, metric = self._place(job, group, batch)
            for node in nodes:
                self._new_alloc(job, group, node, evaluation["ID"], deployment)
            if metric is not None:
                failed[group["Name"]] = metric
        evaluation["Status"] = "complete"
        evaluation["DeploymentID"] = deployment["ID"] if deployment else ""
        if failed:
            evaluation["FailedTGAllocs"] = failed
            blocked = self._new_eval(job, "queued-allocs", status="blocked")
            blocked["PreviousEval"] = evaluation["ID"]
            blocked["FailedTGAllocs"] = copy.deepcopy(failed)
            evaluation["BlockedEval"] = blocked["ID"]
            self._save_eval(blocked)
        self._save_eval(evaluation)

    def _retry_blocked(self) -> None:
        for evaluation in list(self.evals.values()):
            if evaluation["Status"] == "blocked":
                evaluation["Status"] = "pending"
                evaluation["FailedTGAllocs"] = None
                self._save_eval(evaluation)
                self._after(0.05 / self.time_scale, lambda e=evaluation["ID"]: self._process(e))

    def _version(self, key: tuple[str, str], version: int) -> dict[str, Any]:
        return next(v for v in self.versions[key] if v["Version"] == version)

    # -- allocations -----------------------------------------------------------------------------------------

    def _new_alloc(
        self,
        job: dict[str, Any],
        group: dict[str, Any],
        node: Node,
        eval_id: str,
        deployment: dict[str, Any] | None,
        replaces: tuple[dict[str, Any], int] | None = None,
    ) -> dict[str, Any]:
        """A new allocation; ``replaces``: the failed allocation it reschedules, and the delay it waited."""
        task = group["Tasks"][0]
        index = sum(1 for a in self.allocs.values() if a["JobID"] == job["ID"] and a["Namespace"] == job["Namespace"])
        now = time.time_ns()
        alloc: dict[str, Any] = {
            "ID": str(uuid.uuid4()),
            "Namespace": job["Namespace"],
            "EvalID": eval_id,
            "Name": f"{job['ID']}.{group['Name']}[{index}]",
            "NodeID": node.id,
            "NodeName": node.name,
            "JobID": job["ID"],
            "JobVersion": job["Version"],
            "Job": copy.deepcopy(job),
            "TaskGroup": group["Name"],
            "AllocatedResources": {
                "Tasks": {
                    task["Name"]: {
                        "Cpu": {"CpuShares": (task.get("Resources") or {}).get("CPU", 100)},
                        "Memory": {"MemoryMB": (task.get("Resources") or {}).get("MemoryMB", 300)},
                    }
                },
                "Shared": {
                    "Ports": [
                        {"Label": p["Label"], "Value": 20000 + index, "To": p.get("To", 0), "HostIP": "127.0.0.1"}
                        for n in group.get("Networks") or []
                        for p in n.get("DynamicPorts") or []
                    ]
                },
            },
            "DesiredStatus": "run",
            "DesiredDescription": "",
            "DesiredTransition": {},
            "ClientStatus": "pending",
            "ClientDescription": "No tasks have started",
            "TaskStates": {
                task["Name"]: {
                    "State": "pending",
                    "Failed": False,
                    "Restarts": 0,
                    "LastRestart": None,
                    "StartedAt": None,
                    "FinishedAt": None,
                    "Events": [],
                }
            },
            "DeploymentID": deployment["ID"] if deployment else "",
            "DeploymentStatus": None,
            "FollowupEvalID": "",
            "PreviousAllocation": "",
            "NextAllocation": "",
            "RescheduleTracker": None,
            "CreateIndex": self.index + 1,
            "CreateTime": now,
            "_cpu": int((task.get("Resources") or {}).get("CPU") or 100),
            "_mem": int((task.get("Resources") or {}).get("MemoryMB") or 300),
            "_behaviour": self._behaviour(job, task),
            "_task": task["Name"],
            "_restarts": [],
        }
        if replaces is not None:
            previous, delay = replaces
            earlier = (previous.get("RescheduleTracker") or {}).get("Events") or []
            event = {"RescheduleTime": now, "PrevAllocID": previous["ID"], "PrevNodeID": previous["NodeID"]}
            alloc.update(
                PreviousAllocation=previous["ID"], RescheduleTracker={"Events": [*earlier, {**event, "Delay": delay}]}
            )
        self._task_event(alloc, "Received", "Task received by client")
        self._save_alloc(alloc, "AllocationCreated")
        if replaces is not None:
            replaces[0]["NextAllocation"] = alloc["ID"]
            self._save_alloc(replaces[0])
        if deployment is not None:
            deployment["TaskGroups"][group["Name"]]["PlacedAllocs"] += 1
            self._save_deployment(deployment)
        self._after(0.2, lambda: self._setup(alloc["ID"]))
        return alloc

    def _task_event(self, alloc: dict[str, Any], kind: str, message: str, **fields: Any) -> None:
        event = {
            "Type": kind,
            "Time": time.time_ns(),
            "DisplayMessage": message,
            "Details": {},
            "FailsTask": False,
            "RestartReason": "",
            "DriverError": "",
            "ExitCode": 0,
            "Signal": 0,
            "Message": "",
            "StartDelay": 0,
            **fields,
        }
        alloc["TaskStates"][alloc["_task"]]["Events"].append(event)

    def _live(self, alloc_id: str) -> dict[str, Any] | None:
        alloc = self.allocs.get(alloc_id)
        if alloc is None or alloc["DesiredStatus"] != "run" or alloc["ClientStatus"] not in ("pending", "running"):
            return None
        return alloc

    def _setup(self, alloc_id: str) -> None:
        alloc = self._live(alloc_id)
        if alloc is None:
            return
        self._task_event(alloc, "Task Setup", "Building Task Directory")
        self._save_alloc(alloc)
        self._after(0.3, lambda: self._start(alloc_id))

    def _start(self, alloc_id: str) -> None:
        alloc = self._live(alloc_id)
        if alloc is None:
            return
        behaviour = alloc["_behaviour"]
        state = alloc["TaskStates"][alloc["_task"]]
        if isinstance(behaviour, DriverFailure):
            self._task_event(alloc, "Driver Failure", behaviour.error, DriverError=behaviour.error)
            self._exited(alloc)
            return
        self._task_event(alloc, "Started", "Task started by client")
        state.update(State="running", StartedAt=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        alloc.update(ClientStatus="running", ClientDescription="Tasks are running")
        self._save_alloc(alloc)
        update = self._update_block(alloc)
        if isinstance(behaviour, Crash):
            self._after(0.5, lambda: self._crash(alloc_id, behaviour))
        elif isinstance(behaviour, Healthy) and alloc["DeploymentID"]:
            self._after(max(1.0, update.get("MinHealthyTime", 0) / NS), lambda: self._health(alloc_id, True))
        elif isinstance(behaviour, Unhealthy) and alloc["DeploymentID"]:
            self._after(max(1.0, update.get("HealthyDeadline", 300 * NS) / NS), lambda: self._health(alloc_id, False))

    def _update_block(self, alloc: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs.get((alloc["Namespace"], alloc["JobID"])) or alloc["Job"]
        return dict(job.get("Update") or {})

    def _crash(self, alloc_id: str, behaviour: Crash) -> None:
        alloc = self._live(alloc_id)
        if alloc is None:
            return
        parts = [f"Exit Code: {behaviour.exit_code}"]
        if behaviour.message:
            parts.append(f"Exit Message: {json.dumps(behaviour.message)}")
        self._task_event(alloc, "Terminated", ", ".join(parts), ExitCode=behaviour.exit_code, Message=behaviour.message)
        self._exited(alloc)

    def _exited(self, alloc: dict[str, Any]) -> None:
        """The task stopped on its own: restart it per the group's restart policy, or fail the allocation."""
        group = next(g for g in alloc["Job"]["TaskGroups"] if g["Name"] == alloc["TaskGroup"])
        policy = group.get("RestartPolicy") or {}
        attempts, interval = int(policy.get("Attempts", 2)), int(policy.get("Interval") or 1800 * NS)
        delay, mode = int(policy.get("Delay") or 15 * NS), policy.get("Mode") or "fail"
        now = time.monotonic()
        recent = [t for t in alloc["_restarts"] if now - t < interval / NS * self.time_scale]
        state = alloc["TaskStates"][alloc["_task"]]
        if len(recent) < attempts:
            alloc["_restarts"] = [*recent, now]
            state.update(State="pending", Restarts=state["Restarts"] + 1)
            self._task_event(
                alloc,
                "Restarting",
                f"Task restarting in {go_duration(delay)}",
                RestartReason="Restart within policy",
                StartDelay=delay,
            )
            alloc.update(ClientStatus="pending")
            self._save_alloc(alloc)
            alloc_id = alloc["ID"]
            self._after(delay / NS, lambda: self._start(alloc_id))
            return
        reason = f'Exceeded allowed attempts {attempts} in interval {go_duration(interval)} and mode is "{mode}"'
        self._task_event(alloc, "Not Restarting", reason, RestartReason=reason, FailsTask=True)
        state.update(State="dead", Failed=True, FinishedAt=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        alloc.update(ClientStatus="failed", ClientDescription="Failed tasks")
        if alloc["DeploymentID"]:
            alloc["DeploymentStatus"] = {
                "Healthy": False,
                "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "Canary": False,
                "ModifyIndex": self.index,
            }
        self._save_alloc(alloc)
        if alloc["DeploymentID"]:
            self._advance(alloc["DeploymentID"])
        self._reschedule_later(alloc)

    def _reschedule_later(self, alloc: dict[str, Any]) -> None:
        """Nomad's reschedule policy: a failed allocation of a job that still wants it is placed again by a
        follow-up evaluation (``alloc-failure``) after the policy's delay, doubled for each earlier reschedule of it
        with the exponential function, up to ``MaxDelay``; without limit if ``Unlimited``, else at most ``Attempts``
        in ``Interval``. An allocation of a deployment still running is the deployment's to handle."""
        job = self.jobs.get((alloc["Namespace"], alloc["JobID"]))
        deployment = self.deployments.get(alloc["DeploymentID"]) if alloc["DeploymentID"] else None
        if job is None or job.get("Stop") or (deployment is not None and deployment["Status"] == "running"):
            return
        group = next(g for g in alloc["Job"]["TaskGroups"] if g["Name"] == alloc["TaskGroup"])
        policy = group.get("ReschedulePolicy") or {"Delay": 30 * NS, "MaxDelay": 3600 * NS, "Unlimited": True}
        earlier = (alloc.get("RescheduleTracker") or {}).get("Events") or []
        if not policy.get("Unlimited"):
            since = time.time_ns() - int(policy.get("Interval") or 0) * self.time_scale
            if sum(1 for e in earlier if e["RescheduleTime"] >= since) >= int(policy.get("Attempts") or 0):
                return
        delay = int(policy.get("Delay") or 30 * NS)
        if policy.get("DelayFunction", "exponential") == "exponential":
            delay *= 2 ** len(earlier)
        delay = min(delay, int(policy.get("MaxDelay") or delay))
        followup = self._new_eval(job, "alloc-failure")
        followup["WaitUntil"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + delay / NS))
        alloc["FollowupEvalID"] = followup["ID"]
        self._save_eval(followup)
        self._save_alloc(alloc)
        self._after(delay / NS, lambda: self._reschedule(followup["ID"], alloc["ID"], delay))

    def _reschedule(self, eval_id: str, alloc_id: str, delay: int) -> None:
        evaluation, failed = self.evals[eval_id], self.allocs[alloc_id]
        key = (failed["Namespace"], failed["JobID"])
        job = self.jobs.get(key)
        group = next((g for g in (job or {}).get("TaskGroups") or [] if g["Name"] == failed["TaskGroup"]), None)
        running = [a for a in self._current_allocs(*key) if a["TaskGroup"] == failed["TaskGroup"]]
        if job is not None and not job.get("Stop") and group is not None and len(running) < group["Count"]:
            nodes, metric = self._place(job, group, 1)
            for node in nodes:
                self._new_alloc(job, group, node, eval_id, None, replaces=(failed, delay))
            if metric is not None:
                evaluation["FailedTGAllocs"] = {group["Name"]: metric}
        evaluation["Status"] = "complete"
        self._save_eval(evaluation)

    def _health(self, alloc_id: str, healthy: bool) -> None:
        alloc = self._live(alloc_id)
        if alloc is None or alloc["ClientStatus"] != "running":
            return
        alloc["DeploymentStatus"] = {
            "Healthy": healthy,
            "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Canary": False,
            "ModifyIndex": self.index,
        }
        self._save_alloc(alloc)
        self._advance(alloc["DeploymentID"])

    def _stop_alloc(self, alloc: dict[str, Any], why: str) -> None:
        alloc.update(DesiredStatus="stop", DesiredDescription=why)
        self._save_alloc(alloc, "AllocationUpdateDesiredStatus")
        state = alloc["TaskStates"][alloc["_task"]]
        if alloc["ClientStatus"] in ("pending", "running"):
            self._task_event(alloc, "Killing", "Sent interrupt. Waiting 5s before force killing", KillTimeout=5 * NS)
            self._task_event(alloc, "Killed", "Task successfully killed")
            state.update(State="dead", FinishedAt=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            alloc.update(ClientStatus="complete", ClientDescription="All tasks have completed")
            self._save_alloc(alloc)

    # -- deployments -----------------------------------------------------------------------------------------

    def _new_deployment(self, job: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        update = job.get("Update") or {}
        for old in self.deployments.values():
            if (old["Namespace"], old["JobID"]) == (job["Namespace"], job["ID"]) and old["Status"] == "running":
                old.update(Status="cancelled", StatusDescription="Cancelled due to newer version of job")
                self._save_deployment(old)
        deployment = {
            "ID": str(uuid.uuid4()),
            "Namespace": job["Namespace"],
            "JobID": job["ID"],
            "JobVersion": job["Version"],
            "JobModifyIndex": job["JobModifyIndex"],
            "JobSpecModifyIndex": job["JobModifyIndex"],
            "JobCreateIndex": job["CreateIndex"],
            "IsMultiregion": False,
            "Status": "running",
            "StatusDescription": "Deployment is running",
            "TaskGroups": {
                group["Name"]: {
                    "AutoRevert": bool(update.get("AutoRevert")),
                    "AutoPromote": False,
                    "Promoted": False,
                    "ProgressDeadline": update.get("ProgressDeadline", 600 * NS),
                    "RequireProgressBy": None,
                    "PlacedCanaries": None,
                    "DesiredCanaries": 0,
                    "DesiredTotal": group["Count"],
                    "PlacedAllocs": 0,
                    "HealthyAllocs": 0,
                    "UnhealthyAllocs": 0,
                }
            },
            "CreateIndex": self.index + 1,
            "ModifyIndex": self.index + 1,
        }
        self._save_deployment(deployment)
        return deployment

    def _advance(self, deployment_id: str) -> None:
        deployment = self.deployments.get(deployment_id)
        if deployment is None or deployment["Status"] != "running":
            return
        key = (deployment["Namespace"], deployment["JobID"])
        mine = [a for a in self.allocs.values() if a["DeploymentID"] == deployment_id]
        healthy = [a for a in mine if (a["DeploymentStatus"] or {}).get("Healthy") is True]
        unhealthy = [a for a in mine if (a["DeploymentStatus"] or {}).get("Healthy") is False]
        for name, group in deployment["TaskGroups"].items():
            group.update(HealthyAllocs=len(healthy), UnhealthyAllocs=len(unhealthy))
            if unhealthy:
                self._fail_deployment(deployment, key, group["AutoRevert"])
                return
            if len(healthy) >= group["DesiredTotal"]:
                deployment.update(Status="successful", StatusDescription="Deployment completed successfully")
                self._save_deployment(deployment)
                for version in self.versions[key]:
                    if version["Version"] == deployment["JobVersion"]:
                        version["Stable"] = True
                job = self.jobs[key]
                if job["Version"] == deployment["JobVersion"]:
                    job.update(Stable=True, Status="running")
                return
            if len(healthy) == group["PlacedAllocs"]:  # the batch is healthy: roll the next one
                self._save_deployment(deployment)
                job = self.jobs[key]
                evaluation = self._new_eval(job, "deployment-watcher")
                evaluation["DeploymentID"] = deployment_id
                self._save_eval(evaluation)
                self._process_rolling(evaluation, deployment, name)

    def _process_rolling(self, evaluation: dict[str, Any], deployment: dict[str, Any], group_name: str) -> None:
        key = (deployment["Namespace"], deployment["JobID"])
        job = self.jobs[key]
        group = next(g for g in job["TaskGroups"] if g["Name"] == group_name)
        current = [a for a in self._current_allocs(*key) if a["TaskGroup"] == group_name]
        stale = [a for a in current if a["JobVersion"] != job["Version"]]
        batch = min(len(stale), (job.get("Update") or {}).get("MaxParallel") or 1)
        for alloc in stale[:batch]:
            self._stop_alloc(alloc, "alloc is being updated due to job update")
        nodes, _ = self._place(job, group, batch)
        for node in nodes:
            self._new_alloc(job, group, node, evaluation["ID"], deployment)
        evaluation["Status"] = "complete"
        self._save_eval(evaluation)

    def _fail_deployment(self, deployment: dict[str, Any], key: tuple[str, str], auto_revert: bool) -> None:
        description = "Failed due to unhealthy allocations"
        stable = next((v for v in self.versions[key] if v["Stable"] and v["Version"] < deployment["JobVersion"]), None)
        if auto_revert and stable is not None:
            description += f" - rolling back to job version {stable['Version']}"
        deployment.update(Status="failed", StatusDescription=description)
        self._save_deployment(deployment)
        if auto_revert and stable is not None:
            reverted = {k: v for k, v in copy.deepcopy(stable).items() if not k.startswith("_")}
            self._store_job(reverted, self.jobs[key])
            evaluation = self._new_eval(self.jobs[key], "rolling-update")
            self._save_eval(evaluation)
            self._after(0.05 / self.time_scale, lambda: self._process(evaluation["ID"]))

    # -- variables and namespaces ----------------------------------------------------------------------------

    def put_variable(self, namespace: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Nomad writes a Variable in a namespace that does not exist without a word (its state store does not look:
        ``varSetTxn``; hashicorp/nomad#15379), and so does the double."""
        items = body.get("Items")
        if not isinstance(items, dict) or not items:
            raise HttpError(400, "empty variables are invalid")
        if not all(isinstance(v, str) for v in items.values()):
            raise HttpError(400, "json: cannot unmarshal number into Go struct field Variable.Items of type string")
        existing = self.variables.get((namespace, path))
        index = self._bump()
        now = time.time_ns()
        variable = {
            "Namespace": namespace,
            "Path": path,
            "Items": dict(items),
            "CreateIndex": existing["CreateIndex"] if existing else index,
            "ModifyIndex": index,
            "CreateTime": existing["CreateTime"] if existing else now,
            "ModifyTime": now,
        }
        self.variables[(namespace, path)] = variable
        return copy.deepcopy(variable)

    def delete_namespace(self, name: str) -> None:
        """``Namespace.DeleteNamespaces``: never ``default``; not while the namespace holds a job that is not dead, an
        allocation that is not terminal or a Variable (``namespaceTerminalLocally``, one list of errors, 500). One
        that does not exist is no error (the state store's "namespace not found" is only logged)."""
        if name == "default":
            raise HttpError(500, "can not delete default namespace")
        busy = (
            any(ns == name and job.get("Status") != "dead" for (ns, _), job in self.jobs.items())
            or any(
                a["Namespace"] == name and a["ClientStatus"] not in ("complete", "lost", "failed", "unknown")
                for a in self.allocs.values()
            )
            or any(ns == name for ns, _ in self.variables)
        )
        if busy:
            raise _validation_error([f'namespace "{name}" has non-terminal jobs in regions: [global]'])
        self.namespaces.pop(name, None)
        self._bump()


def _spec(job: dict[str, Any]) -> str:
    volatile = {"Version", "CreateIndex", "ModifyIndex", "JobModifyIndex", "Stable", "Status", "SubmitTime", "Stop"}
    return json.dumps({k: v for k, v in job.items() if k not in volatile}, sort_keys=True)


def _group_spec(job: dict[str, Any], name: str) -> str:
    group = next((g for g in job["TaskGroups"] if g["Name"] == name), {})
    return json.dumps({k: v for k, v in group.items() if k != "Count"}, sort_keys=True) + json.dumps(
        {k: v for k, v in job.items() if k in ("Meta", "Datacenters", "Constraints")}, sort_keys=True
    )


_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(p), h)
    for m, p, h in [
        ("GET", r"/v1/status/leader", "leader"),
        ("GET", r"/v1/namespaces", "namespaces"),
        ("GET", r"/v1/namespace/(?P<name>[^/]+)", "namespace_get"),
        ("POST", r"/v1/namespace(?:/(?P<name>[^/]+))?", "namespace_put"),
        ("PUT", r"/v1/namespace(?:/(?P<name>[^/]+))?", "namespace_put"),
        ("DELETE", r"/v1/namespace/(?P<name>[^/]+)", "namespace_delete"),
        ("GET", r"/v1/job/(?P<id>[^/]+)", "job_get"),
        ("POST", r"/v1/job/(?P<id>[^/]+)/plan", "job_plan"),
        ("POST", r"/v1/job/(?P<id>[^/]+)", "job_register"),
        ("PUT", r"/v1/job/(?P<id>[^/]+)", "job_register"),
        ("POST", r"/v1/jobs", "job_register"),
        ("DELETE", r"/v1/job/(?P<id>[^/]+)", "job_delete"),
        ("GET", r"/v1/job/(?P<id>[^/]+)/allocations", "job_allocs"),
        ("GET", r"/v1/job/(?P<id>[^/]+)/versions", "job_versions"),
        ("GET", r"/v1/job/(?P<id>[^/]+)/deployment", "job_deployment"),
        ("GET", r"/v1/job/(?P<id>[^/]+)/deployments", "job_deployments"),
        ("GET", r"/v1/evaluation/(?P<id>[^/]+)", "eval_get"),
        ("GET", r"/v1/evaluation/(?P<id>[^/]+)/allocations", "eval_allocs"),
        ("GET", r"/v1/allocation/(?P<id>[^/]+)", "alloc_get"),
        ("GET", r"/v1/client/allocation/(?P<id>[^/]+)/stats", "alloc_stats"),
        ("GET", r"/v1/var/(?P<path>.+)", "var_get"),
        ("PUT", r"/v1/var/(?P<path>.+)", "var_put"),
        ("DELETE", r"/v1/var/(?P<path>.+)", "var_delete"),
        ("GET", r"/v1/event/stream", "events"),
    ]
]


def _stub(alloc: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "ID",
        "EvalID",
        "Name",
        "Namespace",
        "NodeID",
        "NodeName",
        "JobID",
        "JobVersion",
        "TaskGroup",
        "DesiredStatus",
        "DesiredDescription",
        "ClientStatus",
        "ClientDescription",
        "TaskStates",
        "DeploymentStatus",
        "FollowupEvalID",
        "NextAllocation",
        "RescheduleTracker",
        "CreateIndex",
        "ModifyIndex",
        "CreateTime",
        "ModifyTime",
    )
    return {k: copy.deepcopy(alloc.get(k)) for k in keep} | {"JobType": alloc["Job"].get("Type")}


def _public(alloc: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in alloc.items() if not k.startswith("_")}


class _Handler(BaseHTTPRequestHandler):
    nomad: NomadDouble
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.topics = parse_qs(url.query).get("topic", [])
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        double = self.nomad
        with double.cond:
            double.requests.append((method, self.path, self.body))
        try:
            for verb, pattern, handler in _ROUTES:
                match = pattern.fullmatch(path)
                if match and verb == method:
                    self.args = {k: v for k, v in match.groupdict().items() if v is not None}
                    if handler == "events":
                        with double.cond:
                            self._fault(handler)
                        self._events()
                        return
                    with double.cond:
                        self._fault(handler)
                        self._wait(handler)
                        result = getattr(self, "_" + handler)()
                        index = self._index(handler)
                    self._reply(204 if handler == "var_delete" else 200, result, index)
                    return
            raise HttpError(404, f"Invalid URL: {path}" if path.startswith("/v1/") else "")
        except HttpError as exc:
            self._reply(exc.code, exc.args[0], None)

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731
    do_PUT = lambda self: self._dispatch("PUT")  # noqa: E731
    do_DELETE = lambda self: self._dispatch("DELETE")  # noqa: E731

    def _reply(self, code: int, result: Any, index: int | None) -> None:
        if code >= 400:
            data, kind = str(result).encode(), "text/plain"
        elif code == 204:
            data, kind = b"", ""
        else:
            data, kind = json.dumps(result).encode(), "application/json"
        self.send_response(code)
        if kind:
            self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        if index is not None:
            self.send_header("X-Nomad-Index", str(index))
            self.send_header("X-Nomad-KnownLeader", "true")
            self.send_header("X-Nomad-LastContact", "0")
        self.end_headers()
        self.wfile.write(data)

    def _fault(self, handler: str) -> None:
        """Fail this request if its route is made to fail (:meth:`NomadDouble.failing`); lock held."""
        if self.nomad.fails(handler, self.args.get("id")):
            fault = self.nomad.faults[handler]
            if fault.times_left is not None:
                fault.times_left -= 1
            raise HttpError(fault.code, fault.message)

    def _index(self, handler: str) -> int:
        """The index a read answers with, and a blocking query waits on: an evaluation's own ``ModifyIndex`` (as
        ``Eval.GetEval`` does: a change elsewhere does not release a query on it); the latest index otherwise."""
        if handler == "eval_get":
            evaluation = self.nomad.evals.get(self.args["id"])
            if evaluation is not None:
                return int(evaluation["ModifyIndex"])
        return self.nomad.index

    def _wait(self, handler: str) -> None:
        """A blocking query: hold the answer until the index passes ``?index=`` or ``?wait=`` runs out."""
        if self.command != "GET" or not self.query.get("index"):
            return
        try:
            index = int(self.query["index"])
        except ValueError:
            raise HttpError(400, "Invalid index") from None
        wait = self.query.get("wait", "300s")
        match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", wait)
        if not match:
            raise HttpError(400, "Invalid wait time")
        seconds = float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]
        nomad = self.nomad
        if self._index(handler) > index:
            return
        nomad.held += 1
        nomad.cond.notify_all()
        try:
            nomad.cond.wait_for(lambda: self._index(handler) > index or nomad._closing, timeout=min(seconds, 600))
        finally:
            nomad.held -= 1

    def _json_body(self) -> dict[str, Any]:
        if not self.body:
            raise HttpError(400, "Request body is empty")
        try:
            body = json.loads(self.body)
        except ValueError as exc:
            raise HttpError(400, f"invalid character in request body: {exc}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "json: cannot unmarshal array into Go value of type api.JobRegisterRequest")
        return body

    def _policy(self) -> Any:
        tokens = self.nomad.tokens
        if tokens is None:
            return Policy(management=True)
        secret = self.headers.get("X-Nomad-Token")
        if not secret:
            return Policy()
        if secret not in tokens:
            raise HttpError(403, "ACL token not found")
        return tokens[secret]

    def _need(self, namespace: str, capability: str) -> None:
        if not self._policy().allows(namespace, capability):
            raise HttpError(403, "Permission denied")

    @property
    def ns(self) -> str:
        return self.query.get("namespace") or "default"

    # -- handlers (lock held) --

    def _leader(self) -> Any:
        return "127.0.0.1:4647"

    def _namespaces(self) -> Any:
        policy = self._policy()
        return [
            copy.deepcopy(n)
            for name, n in sorted(self.nomad.namespaces.items())
            if policy.management or any(fnmatch.fnmatchcase(name, g) for g in policy.namespaces)
        ]

    def _namespace_get(self) -> Any:
        name = self.args["name"]
        policy = self._policy()
        if not (policy.management or any(fnmatch.fnmatchcase(name, g) for g in policy.namespaces)):
            raise HttpError(403, "Permission denied")
        if name not in self.nomad.namespaces:
            raise HttpError(404, "Namespace not found")
        return copy.deepcopy(self.nomad.namespaces[name])

    def _namespace_put(self) -> Any:
        if not self._policy().management:
            raise HttpError(403, "Permission denied")
        body = self._json_body()
        name = body.get("Name") or self.args.get("name")
        if not name or not re.fullmatch(r"[a-zA-Z0-9-]{1,128}", name):
            raise HttpError(400, f"invalid name {name!r}. Must match regex ^[a-zA-Z0-9-]{{1,128}}$")
        index = self.nomad._bump()
        existing = self.nomad.namespaces.get(name)
        self.nomad.namespaces[name] = {
            "Name": name,
            "Description": body.get("Description", ""),
            "Meta": body.get("Meta"),
            "Quota": "",
            "Capabilities": None,
            "CreateIndex": existing["CreateIndex"] if existing else index,
            "ModifyIndex": index,
        }
        return None

    def _namespace_delete(self) -> Any:
        if not self._policy().management:
            raise HttpError(403, "Permission denied")
        self.nomad.delete_namespace(self.args["name"])
        return None

    def _job(self) -> dict[str, Any]:
        job = self.nomad.jobs.get((self.ns, self.args["id"]))
        if job is None:
            raise HttpError(404, "job not found")
        return job

    def _job_get(self) -> Any:
        self._need(self.ns, "read-job")
        return copy.deepcopy(self._job())

    def _register_body(self) -> tuple[dict[str, Any], dict[str, Any], str]:
        body = self._json_body()
        job = body.get("Job")
        if not isinstance(job, dict):
            raise HttpError(400, "Job must be specified")
        _check_types(job)
        if not job.get("ID"):
            raise HttpError(400, "Job ID hasn't been provided")
        if "id" in self.args and job["ID"] != self.args["id"]:
            raise HttpError(400, "Job ID does not match name")
        namespace = job.get("Namespace") or self.ns
        return body, job, namespace

    def _job_plan(self) -> Any:
        _, job, namespace = self._register_body()
        self._need(namespace, "submit-job")
        self.nomad.validate_job(job, namespace)
        return self.nomad.plan(job, namespace)

    def _job_register(self) -> Any:
        body, job, namespace = self._register_body()
        self._need(namespace, "submit-job")
        self.nomad.validate_job(job, namespace)
        enforce = int(body.get("JobModifyIndex") or 0) if body.get("EnforceIndex") else None
        return self.nomad.register(job, namespace, enforce)

    def _job_delete(self) -> Any:
        self._need(self.ns, "submit-job")
        return self.nomad.deregister(self.ns, self.args["id"], self.query.get("purge") == "true")

    def _job_allocs(self) -> Any:
        """``Job.Allocations`` (nomad/job_endpoint.go) looks no job up: a job it does not hold (never registered, or
        purged, its allocations not yet collected) is listed with the allocations it has, none or old ones."""
        self._need(self.ns, "read-job")
        return [
            _stub(a) for a in self.nomad.allocs.values() if (a["Namespace"], a["JobID"]) == (self.ns, self.args["id"])
        ]

    def _job_versions(self) -> Any:
        self._need(self.ns, "read-job")
        versions = self.nomad.versions.get((self.ns, self.args["id"]))
        if not versions:
            raise HttpError(404, "job versions not found")  # jobVersions, command/agent/job_endpoint.go
        return {"Versions": copy.deepcopy(versions), "Diffs": None}

    def _job_deployment(self) -> Any:
        self._need(self.ns, "read-job")
        found = [
            d for d in self.nomad.deployments.values() if (d["Namespace"], d["JobID"]) == (self.ns, self.args["id"])
        ]
        return copy.deepcopy(max(found, key=lambda d: d["CreateIndex"])) if found else None

    def _job_deployments(self) -> Any:
        self._need(self.ns, "read-job")  # no job looked up either (Job.Deployments)
        found = [
            d for d in self.nomad.deployments.values() if (d["Namespace"], d["JobID"]) == (self.ns, self.args["id"])
        ]
        return copy.deepcopy(sorted(found, key=lambda d: -d["CreateIndex"]))

    def _eval(self) -> dict[str, Any]:
        evaluation = self.nomad.evals.get(self.args["id"])
        if evaluation is None or evaluation["Namespace"] != self.ns:
            raise HttpError(404, "eval not found")
        self._need(self.ns, "read-job")
        return evaluation

    def _eval_get(self) -> Any:
        return copy.deepcopy(self._eval())

    def _eval_allocs(self) -> Any:
        evaluation = self._eval()
        return [_stub(a) for a in self.nomad.allocs.values() if a["EvalID"] == evaluation["ID"]]

    def _alloc(self) -> dict[str, Any]:
        alloc = self.nomad.allocs.get(self.args["id"])
        if alloc is None:
            raise HttpError(404, "alloc not found")
        self._need(alloc["Namespace"], "read-job")
        return alloc

    def _alloc_get(self) -> Any:
        return _public(self._alloc())

    def _alloc_stats(self) -> Any:
        alloc = self._alloc()
        if alloc["ClientStatus"] != "running":
            raise HttpError(404, f'Unknown allocation "{alloc["ID"]}"')
        now = time.time_ns()
        rss = (40 + hash(alloc["ID"]) % 20) * 2**20
        usage = {
            "MemoryStats": {
                "RSS": rss,
                "Cache": 0,
                "Swap": 0,
                "Usage": rss + 2**20,
                "MaxUsage": rss + 2**21,
                "KernelUsage": 0,
                "KernelMaxUsage": 0,
                "Measured": ["RSS", "Cache", "Swap", "Usage", "Max Usage"],
            },
            "CpuStats": {
                "SystemMode": 0.4,
                "UserMode": 1.1,
                "TotalTicks": 37.5,
                "ThrottledPeriods": 0,
                "ThrottledTime": 0,
                "Percent": 1.5,
                "Measured": ["System Mode", "User Mode", "Percent"],
            },
            "DeviceStats": [],
        }
        return {
            "ResourceUsage": usage,
            "Tasks": {alloc["_task"]: {"ResourceUsage": usage, "Timestamp": now, "Pids": None}},
            "Timestamp": now,
        }

    def _var_need(self, capability: str) -> None:
        if not self._policy().allows_variable(self.ns, self.args["path"], capability):
            raise HttpError(403, "Permission denied")

    def _var_get(self) -> Any:
        self._var_need("read")
        variable = self.nomad.variables.get((self.ns, self.args["path"]))
        if variable is None:
            raise HttpError(404, "variable not found")
        return copy.deepcopy(variable)

    def _var_put(self) -> Any:
        self._var_need("write")
        body = self._json_body()
        if body.get("Path", self.args["path"]) != self.args["path"]:
            raise HttpError(400, "variable path does not match the request path")
        return self.nomad.put_variable(self.ns, self.args["path"], body)

    def _var_delete(self) -> Any:
        """204, whether the Variable was there or not (``variableDelete``, command/agent/variable_endpoint.go;
        ``svDeleteTxn``, nomad/state/state_store_variables.go)."""
        self._var_need("destroy")
        self.nomad.variables.pop((self.ns, self.args["path"]), None)
        self.nomad._bump()
        return None

    # -- the event stream --

    def _events(self) -> None:
        namespace = self.query.get("namespace") or "default"
        try:
            start = int(self.query.get("index") or 0)
        except ValueError:
            raise HttpError(400, "Unable to parse index: invalid syntax") from None
        topics: dict[str, list[str]] = {}
        for raw in self.topics or ["*:*"]:
            name, _, key = raw.partition(":")
            topics.setdefault(name, []).append(key or "*")
        needs_read = {"Job", "Allocation", "Evaluation", "Deployment", "Service"}
        for name in topics:
            if name in needs_read and namespace == "*":
                if not self._policy().allows_stream_of_all_namespaces("read-job"):
                    raise HttpError(403, "Permission denied")
            elif name in needs_read:
                self._need(namespace, "read-job")
            elif not self._policy().management:
                raise HttpError(403, "Permission denied")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        double = self.nomad
        with double.cond:
            sent, broker = double.stream_start(start) - 1, double.generation

        def ended() -> bool:
            return double._closing or double.fails("events") or double.generation != broker or double.cut_streams

        def broke() -> bool:
            """A frame's first bytes, then the connection is cut: no end of the chunked body (a network that drops
            the connection, a proxy or a Nomad server killed mid-write)."""
            if not double.break_streams:
                return False
            frame = json.dumps({"Index": sent + 1, "Events": []}).encode()
            self.wfile.write(f"{len(frame):x}\r\n".encode() + frame[: len(frame) // 2])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return True

        with contextlib.suppress(OSError):
            while True:
                with double.cond:
                    pending = [(i, e) for i, e in double.events if i > sent]
                    if not pending and not ended():
                        double.cond.wait(timeout=double.heartbeat_s)
                        pending = [(i, e) for i, e in double.events if i > sent]
                    if broke():
                        return
                    if ended():
                        self._chunk(b"")
                        self.close_connection = double._closing  # a Nomad shut down serves no kept-alive one
                        return
                if not pending:
                    self._chunk(b"{}\n")
                    continue
                for index, group in itertools.groupby(pending, key=lambda p: p[0]):
                    chosen = [e for _, e in group if _wanted(e, namespace, topics)]
                    sent = index
                    if chosen:
                        self._chunk(json.dumps({"Index": index, "Events": chosen}).encode() + b"\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _wanted(event: dict[str, Any], namespace: str, topics: dict[str, list[str]]) -> bool:
    if namespace != "*" and event.get("Namespace") not in (namespace, "", None):
        return False
    for name in (event["Topic"], "*"):
        for key in topics.get(name, []):
            if key == "*" or key == event["Key"] or key in (event.get("FilterKeys") or []):
                return True
    return False


@contextlib.contextmanager
def nomad_double(**kwargs: Any) -> Iterator[NomadDouble]:
    with NomadDouble(**kwargs) as double:
        yield double
