"""The local scheduler: runs the task of a rendered Nomad job as supervised subprocesses on this machine.

It reads the same job JSON that Nomad would get: the task's driver config (``command``/``args``), its
``Env`` (with ``${NOMAD_...}`` runtime variables filled in), ``Resources.MemoryMB`` (enforced by killing
the task when its resident memory goes over, as Nomad reports an OOM kill), the group's
``RestartPolicy``, ``Count`` and dynamic ports, and the task's ``KillTimeout``. A task's output goes to its
allocation's log, kept to :data:`LOG_MAX_BYTES` and as much again before it, as Nomad rotates a task's logs. The
task's ``Templates`` (model keys from a Nomad Variable) are ignored: a local task gets those keys from the control
plane's environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent.aio import cancel_and_wait, exit_reason
from control.backends.base import (
    AllocState,
    JobNotOwned,
    JobRejected,
    JobStatus,
    Registry,
    ServiceInstance,
    StatusCallback,
    StatusUpdate,
    SubmitResult,
)
from control.jobspec import model_key_secret
from control.procs import die_with_parent, private_dir, private_log

__all__ = ["LocalScheduler"]

log = logging.getLogger("caravan.scheduler.local")
NS = 1_000_000_000
_MEMORY_POLL_S = 0.5
_COLLECT_EVERY_S = 3600.0
"""How often allocations that ended long ago are looked for (and once as the scheduler starts)."""
LOG_MAX_BYTES = 10 * 2**20
"""An allocation's log (``<alloc>.log``) past this size starts again empty, its last ``LOG_MAX_BYTES`` (whole lines)
kept in ``<alloc>.log.1`` instead of the ones there: Nomad keeps a task's output to ``max_file_size`` (10 MB) a file
likewise. An agent at debug writes each model call whole; its log would otherwise grow until the disk is full."""
_PROC_STAT = os.path.exists("/proc/self/stat")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if _PROC_STAT else 4096


@dataclass(frozen=True)
class _ServiceSpec:
    """The group's service block: registered in discovery, its HTTP check run here as Nomad would."""

    name: str
    port_label: str
    meta: dict[str, str]
    check_path: str | None
    check_interval: float
    check_timeout: float

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> _ServiceSpec | None:
        services = group.get("Services") or []
        if not services:
            return None
        service = services[0]
        check = next((c for c in service.get("Checks") or [] if c.get("Type") == "http"), None)
        return cls(
            name=str(service["Name"]),
            port_label=str(service.get("PortLabel") or ""),
            meta={str(k): str(v) for k, v in (service.get("Meta") or {}).items()},
            check_path=str(check.get("Path") or "/") if check else None,
            check_interval=(check.get("Interval") or 10 * NS) / NS if check else 10.0,
            check_timeout=(check.get("Timeout") or 2 * NS) / NS if check else 2.0,
        )


@dataclass(frozen=True)
class _TaskSpec:
    command: str
    args: list[str]
    env: dict[str, str]
    memory_mb: int
    kill_timeout: float
    kill_signal: int
    port_labels: list[str]
    restart_attempts: int
    restart_interval: float
    restart_delay: float
    restart_mode: str
    service: _ServiceSpec | None = None

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> tuple[_TaskSpec, int]:
        try:
            group = job["TaskGroups"][0]
            task = group["Tasks"][0]
            driver = task["Driver"]
            config = task.get("Config") or {}
            policy = group.get("RestartPolicy") or {}
            resources = task.get("Resources") or {}
        except (KeyError, IndexError, TypeError) as exc:
            raise JobRejected(f"job has no task group with a task: {exc}") from exc
        if driver not in ("raw_exec", "exec"):
            raise JobRejected(f"the local scheduler runs raw_exec and exec tasks, not {driver!r}")
        if not config.get("command"):
            raise JobRejected("task config has no command")
        ports = [p["Label"] for net in group.get("Networks") or [] for p in net.get("DynamicPorts") or []]
        spec = cls(
            command=str(config["command"]),
            args=[str(a) for a in config.get("args") or []],
            env={str(k): str(v) for k, v in (task.get("Env") or {}).items()},
            memory_mb=int(resources.get("MemoryMB") or 300),
            kill_timeout=(task.get("KillTimeout") or 5 * NS) / NS,
            kill_signal=getattr(signal, str(task.get("KillSignal") or "SIGTERM"), signal.SIGTERM),
            port_labels=ports,
            restart_attempts=int(policy.get("Attempts", 2)),
            restart_interval=(policy.get("Interval") or 30 * 60 * NS) / NS,
            restart_delay=(policy.get("Delay") or 15 * NS) / NS,
            restart_mode=str(policy.get("Mode") or "fail"),
            service=_ServiceSpec.from_group(group),
        )
        return spec, int(group.get("Count", 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _interpolate(value: str, runtime: dict[str, str]) -> str:
    for key, replacement in runtime.items():
        value = value.replace("${" + key + "}", replacement)
    return value


_KILLED_FROM_OUTSIDE = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT})
"""Signals a task gets from someone else (an operator, the kernel's OOM killer, a stop): its last lines are no
reason. A task that crashes on its own (exits with a code, aborts, faults) gets them added."""


def _tail(path: Path, since: int, lines: int = 2) -> str:
    """The last ``lines`` lines of the log written from offset ``since`` on (where this run of the task began: the
    log is shared by its restarts, and a crash that wrote nothing must not quote the run before it). A log rotated
    since, shorter than that, is all this run's."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(since if since <= size else 0, size - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])[:500]


@dataclass
class _Alloc:
    id: str
    index: int
    job: _Job
    state: AllocState = AllocState.PENDING
    reason: str | None = None
    process: asyncio.subprocess.Process | None = None
    restarts: deque[float] = field(default_factory=deque)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    supervisor: asyncio.Task[None] | None = None
    oom: str | None = None
    cpu: _CpuSample | None = None


@dataclass(frozen=True)
class _CpuSample:
    pid: int
    busy_s: float  # user + system CPU time of the process so far
    at: float  # time.monotonic() of the reading
    percent: float  # of one core, over the interval that ended then


_CPU_INTERVAL_S = 1.0
"""Stats read again sooner than this give the last figure: CPU times tick in hundredths of a second."""


def _cpu_percent(proc: psutil.Process, last: _CpuSample | None) -> _CpuSample:
    """An allocation's CPU use since the last reading, or since it started at the first (psutil's own first reading
    of a process is always 0.0, and stats made a new one each time)."""
    times = proc.cpu_times()
    busy, now = times.user + times.system, time.monotonic()
    if last is not None and last.pid == proc.pid:
        if now - last.at < _CPU_INTERVAL_S:
            return last
        return _CpuSample(proc.pid, busy, now, 100 * (busy - last.busy_s) / (now - last.at))
    lived = time.time() - proc.create_time()
    return _CpuSample(proc.pid, busy, now, 100 * busy / lived if lived > 0 else 0.0)


@dataclass
class _Job:
    namespace: str
    job_id: str
    version: int
    spec: _TaskSpec
    meta: dict[str, str]
    secrets: dict[str, str] = field(default_factory=dict)
    allocs: list[_Alloc] = field(default_factory=list)


class LocalScheduler:
    name = "local"
    supports_stats = True

    def __init__(
        self,
        alloc_dir: Path,
        install_id: str = "caravan",
        registry: Registry | None = None,
        max_parallel_starts: int | None = None,
        task_secrets: Mapping[str, str] | None = None,
        log_max_bytes: int = LOG_MAX_BYTES,
        keep_days: float = 0,
    ) -> None:
        """``task_secrets``: what every task gets besides its own secrets (the credentials written in the agents'
        NATS URL, the flag store's token and TLS settings: :func:`control.jobspec.task_secrets`). ``keep_days``:
        how long the log and directory of an allocation that no longer runs are kept after its last write (0: for
        good), as Nomad collects its terminal allocations."""
        self._alloc_dir = alloc_dir
        self._log_max_bytes = log_max_bytes
        self._keep_s = keep_days * 86_400
        self._task_secrets = dict(task_secrets or {})
        # Tasks start a few at a time, each until its health check passes (or 10 s): fifty agents started at
        # once (a restart reconciling them all) would otherwise starve NATS and the control plane of CPU.
        self._starting = asyncio.Semaphore(max_parallel_starts or max(2, os.cpu_count() or 2))
        self._registry = registry
        self._install_id = install_id
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._callbacks: list[StatusCallback] = []
        self._started = False
        self._closed = False
        self._lock = asyncio.Lock()
        self._memory_watch: asyncio.Task[None] | None = None
        self._collector: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LocalScheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def on_status(self, callback: StatusCallback) -> None:
        self._callbacks.append(callback)

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("local scheduler already started")
        self._started = True
        private_dir(self._alloc_dir)
        self._memory_watch = asyncio.create_task(self._watch(), name="memory-limits")
        if self._keep_s:
            self._collector = asyncio.create_task(self._collect_hourly(), name="old-allocations")

    async def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(self._stop_allocs(job) for job in list(self._jobs.values())))
        self._jobs.clear()
        for task in (self._memory_watch, self._collector):
            if task is not None:
                await cancel_and_wait(task)

    def _check_owner(self, meta: dict[str, str], job_id: str) -> None:
        if meta.get("caravan_owner") != self._install_id:
            raise JobNotOwned(f"job {job_id!r} is not owned by Caravan installation {self._install_id!r}")

    async def submit(self, job: dict[str, Any], secrets: Mapping[str, str] | None = None) -> SubmitResult:
        if not self._started or self._closed:
            raise RuntimeError("local scheduler is not running")
        try:
            key = (str(job["Namespace"]), str(job["ID"]))
        except KeyError as exc:
            raise JobRejected(f"job is missing {exc}") from exc
        meta = {str(k): str(v) for k, v in (job.get("Meta") or {}).items()}
        self._check_owner(meta, key[1])
        spec, count = _TaskSpec.from_job(job)
        async with self._lock:
            previous = self._jobs.get(key)
            if previous is not None:
                self._check_owner(previous.meta, key[1])
                await self._stop_allocs(previous)
            entry = _Job(key[0], key[1], (previous.version + 1) if previous else 0, spec, meta, dict(secrets or {}))
            self._jobs[key] = entry
            for index in range(count):
                alloc = _Alloc(id=str(uuid.uuid4()), index=index, job=entry)
                entry.allocs.append(alloc)
                alloc.supervisor = asyncio.create_task(self._supervise(alloc), name=f"alloc-{alloc.id[:8]}")
        return SubmitResult(
            job_id=key[1], namespace=key[0], version=entry.version, alloc_ids=[a.id for a in entry.allocs]
        )

    async def stop_job(self, namespace: str, job_id: str) -> None:
        async with self._lock:
            job = self._jobs.get((namespace, job_id))
            if job is None:
                return
            self._check_owner(job.meta, job_id)
            await self._stop_allocs(job)

    async def job_status(self, namespace: str, job_id: str) -> JobStatus | None:
        job = self._jobs.get((namespace, job_id))
        if job is None:
            return None
        return JobStatus(
            job_id=job_id,
            namespace=namespace,
            version=job.version,
            allocs={a.id: a.state for a in job.allocs},
            reasons={a.id: a.reason for a in job.allocs if a.reason},
        )

    async def alloc_stats(self, namespace: str, job_id: str) -> list[dict[str, Any]]:
        """CPU percent and resident memory of each running allocation (what Nomad's client API reports)."""
        out: list[dict[str, Any]] = []
        job = self._jobs.get((namespace, job_id))
        for alloc in job.allocs if job else []:
            if alloc.process is None or alloc.process.returncode is not None:
                continue
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(alloc.process.pid)
                alloc.cpu = _cpu_percent(proc, alloc.cpu)
                out.append(
                    {
                        "alloc_id": alloc.id,
                        "cpu_percent": round(alloc.cpu.percent, 1),
                        "memory_rss_mb": round(proc.memory_info().rss / 2**20, 1),
                    }
                )
        return out

    def log_path(self, alloc: _Alloc) -> Path:
        return self._alloc_dir / alloc.job.namespace / alloc.job.job_id / f"{alloc.id}.log"

    async def _emit(self, alloc: _Alloc, state: AllocState, reason: str | None = None) -> None:
        alloc.state, alloc.reason = state, reason
        update = StatusUpdate(alloc.job.namespace, alloc.job.job_id, alloc.id, state, reason, alloc.job.meta)
        for callback in self._callbacks:
            try:
                await callback(update)
            except Exception:
                log.exception("status callback failed for %s", alloc.job.job_id)

    async def _stop_allocs(self, job: _Job) -> None:
        await asyncio.gather(*(self._stop_alloc(a) for a in job.allocs))

    async def _stop_alloc(self, alloc: _Alloc) -> None:
        alloc.stop_requested.set()
        if alloc.supervisor is not None and alloc.supervisor is not asyncio.current_task():
            await alloc.supervisor

    @staticmethod
    async def _terminate(alloc: _Alloc, proc: asyncio.subprocess.Process) -> None:
        """The kill signal, then SIGKILL once the task's kill timeout has passed."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, alloc.job.spec.kill_signal)
        try:
            await asyncio.wait_for(proc.wait(), timeout=alloc.job.spec.kill_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    def _runtime_env(self, alloc: _Alloc, ports: dict[str, int], task_dir: Path) -> dict[str, str]:
        job = alloc.job
        runtime = {
            "NOMAD_ALLOC_ID": alloc.id,
            "NOMAD_ALLOC_INDEX": str(alloc.index),
            "NOMAD_JOB_ID": job.job_id,
            "NOMAD_JOB_NAME": job.job_id,
            "NOMAD_NAMESPACE": job.namespace,
            "NOMAD_TASK_NAME": "agent",
            "NOMAD_GROUP_NAME": "agent",
            "NOMAD_TASK_DIR": str(task_dir),
            "NOMAD_ALLOC_DIR": str(task_dir.parent),
            "NOMAD_MEMORY_LIMIT": str(job.spec.memory_mb),
        }
        for label, port in ports.items():
            runtime[f"NOMAD_PORT_{label}"] = str(port)
            runtime[f"NOMAD_IP_{label}"] = "127.0.0.1"
            runtime[f"NOMAD_ADDR_{label}"] = f"127.0.0.1:{port}"
        return runtime

    async def _supervise(self, alloc: _Alloc) -> None:
        spec = alloc.job.spec
        while not alloc.stop_requested.is_set():
            try:
                reason = await self._run_once(alloc)
            except Exception as exc:  # a bug or an environment the OS refuses: a failed run, not a dead supervisor
                log.exception("allocation %s of %s could not run", alloc.id, alloc.job.job_id)
                reason = f"could not run the task: {type(exc).__name__}: {exc}"
            if alloc.stop_requested.is_set():
                break
            now = time.monotonic()
            alloc.restarts.append(now)
            while alloc.restarts and alloc.restarts[0] < now - spec.restart_interval:
                alloc.restarts.popleft()
            if len(alloc.restarts) > spec.restart_attempts:
                if spec.restart_mode == "fail":
                    await self._emit(
                        alloc,
                        AllocState.FAILED,
                        f"{reason}; restart policy exhausted "
                        f"({spec.restart_attempts} restarts within {spec.restart_interval:g}s)",
                    )
                    return
                delay = spec.restart_interval - (now - alloc.restarts[0])
                alloc.restarts.clear()
            else:
                delay = spec.restart_delay
            attempt = len(alloc.restarts)
            await self._emit(alloc, AllocState.RESTARTING, f"{reason}; restart {attempt} in {delay:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(alloc.stop_requested.wait(), timeout=delay)
        await self._emit(alloc, AllocState.STOPPED, "stopped on request")

    async def _run_once(self, alloc: _Alloc) -> str:
        """Start the task, wait for it to exit and say why it did."""
        spec = alloc.job.spec
        task_dir = self.log_path(alloc).parent / alloc.id / "local"
        task_dir.mkdir(parents=True, exist_ok=True)
        ports = {label: _free_port() for label in spec.port_labels}
        runtime = self._runtime_env(alloc, ports, task_dir)
        env = {
            **_base_env(),
            **self._task_secrets,
            **model_key_secret(alloc.job.meta, os.environ),
            **alloc.job.secrets,
            **runtime,
            **{k: _interpolate(v, runtime) for k, v in spec.env.items()},
        }
        args = [_interpolate(a, runtime) for a in spec.args]
        await self._emit(alloc, AllocState.STARTING)
        if not await self._start_slot(alloc):
            return "stopped before it started"
        healthy = asyncio.Event()
        log_path = self.log_path(alloc)
        alloc.oom = None
        slot: asyncio.Task[None] | None = None
        try:  # the start slot is released by the slot task once the task is healthy, or here if it never starts
            with private_log(log_path) as log_file:
                began = log_file.seek(0, os.SEEK_END)
                try:
                    alloc.process = await asyncio.create_subprocess_exec(
                        spec.command,
                        *args,
                        env=env,
                        cwd=str(task_dir),
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=asyncio.subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=die_with_parent,  # the scheduler dies: its tasks get SIGTERM
                    )
                except OSError as exc:
                    return f"failed to start {spec.command!r}: {exc.strerror or exc}"
            proc = alloc.process
            await self._emit(alloc, AllocState.RUNNING)
            checker = None
            if self._registry and spec.service:
                checker = asyncio.create_task(self._run_checks(alloc, ports, healthy))
            else:
                healthy.set()
            slot = asyncio.create_task(self._release_start_slot(healthy, proc))
        finally:
            if slot is None:
                self._starting.release()
        stop = asyncio.create_task(alloc.stop_requested.wait())
        try:
            await asyncio.wait([asyncio.ensure_future(proc.wait()), stop], return_when=asyncio.FIRST_COMPLETED)
            if proc.returncode is None:
                await self._terminate(alloc, proc)
        finally:
            stop.cancel()
            await slot
            if checker is not None:
                await cancel_and_wait(checker)
                await self._deregister(alloc)
        code = proc.returncode
        assert code is not None
        if alloc.oom:
            return alloc.oom
        why = exit_reason(code)
        if code == 0 or -code in _KILLED_FROM_OUTSIDE:  # what it logged last would read as the cause
            return why
        tail = _tail(log_path, began)
        return f"{why}: {tail}" if tail else why

    async def _start_slot(self, alloc: _Alloc) -> bool:
        """Wait for a start slot; False if the allocation was stopped meanwhile."""
        acquire = asyncio.ensure_future(self._starting.acquire())
        stopped = asyncio.ensure_future(alloc.stop_requested.wait())
        await asyncio.wait([acquire, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if alloc.stop_requested.is_set():
            if acquire.done() and not acquire.cancelled():
                self._starting.release()
            acquire.cancel()
            return False
        return True

    async def _release_start_slot(self, healthy: asyncio.Event, proc: asyncio.subprocess.Process) -> None:
        waits = [asyncio.ensure_future(healthy.wait()), asyncio.ensure_future(proc.wait())]
        try:
            await asyncio.wait(waits, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            self._starting.release()

    async def _registry_call(self, what: str, call: Awaitable[None]) -> None:
        """Discovery is best effort for the scheduler: a registry that is down must not stop supervision."""
        try:
            await call
        except Exception as exc:  # any backend's error: logged; the next check result tries again
            log.warning("registry %s failed: %s", what, exc)

    async def _run_checks(self, alloc: _Alloc, ports: dict[str, int], healthy: asyncio.Event) -> None:
        """Register the allocation's service and keep its status from the job's HTTP check."""
        service = alloc.job.spec.service
        assert self._registry is not None and service is not None
        port = ports.get(service.port_label, 0)
        instance = ServiceInstance(
            id=alloc.id,
            name=service.name,
            address="127.0.0.1",
            port=port,
            meta=service.meta,
            ttl_s=max(3 * service.check_interval, 5.0),
        )
        await self._registry_call("register", self._registry.register(instance))
        if service.check_path is None:
            healthy.set()
            passing = instance.model_copy(update={"status": "passing"})
            await self._registry_call("update", self._registry.set_status(passing))
            return
        passing_before = False
        while True:
            ok, output = await _http_check("127.0.0.1", port, service.check_path, service.check_timeout)
            if ok:
                healthy.set()
            if ok or passing_before:
                update = instance.model_copy(update={"status": "passing" if ok else "critical", "output": output})
                await self._registry_call("update", self._registry.set_status(update))
            passing_before = ok
            # until the first pass, check often (a new task comes up in well under a second)
            await asyncio.sleep(service.check_interval if ok else 0.1)

    async def _deregister(self, alloc: _Alloc) -> None:
        service = alloc.job.spec.service
        if self._registry is not None and service is not None:
            await self._registry_call("deregister", self._registry.deregister(service.name, alloc.id))

    async def _collect_hourly(self) -> None:
        """Allocations that ended long ago (``keep_days``) are collected as the scheduler starts and hourly."""
        while True:
            try:
                await asyncio.to_thread(self._collect, self._known_alloc_ids())
            except Exception:  # tried again at the next round
                log.exception("old allocations not collected")
            await asyncio.sleep(_COLLECT_EVERY_S)

    async def _watch(self) -> None:
        """Every running task's resident memory, its children's included, against its limit, and its log's size.
        One pass over the process table per tick for all tasks: a pass per task would cost the control plane a core
        at fifty."""
        while True:
            await asyncio.sleep(_MEMORY_POLL_S)
            running = self._running()
            try:
                self._enforce_memory(running)
            except Exception:  # one failed pass must not end the limits of every task for good
                log.exception("memory limit check failed")
            for path in self._logs_over_limit(running):
                try:
                    await asyncio.to_thread(_rotate_log, path, self._log_max_bytes)
                except OSError as exc:  # a full disk, say: tried again next tick
                    log.warning("could not keep the log %s to %d bytes: %s", path, self._log_max_bytes, exc)

    def _known_alloc_ids(self) -> set[str]:
        return {alloc.id for job in list(self._jobs.values()) for alloc in job.allocs}

    def _running(self) -> list[tuple[_Alloc, asyncio.subprocess.Process]]:
        """Each allocation whose process runs, with it."""
        return [
            (alloc, alloc.process)
            for job in list(self._jobs.values())
            for alloc in job.allocs
            if alloc.process is not None and alloc.process.returncode is None
        ]

    def _collect(self, current: set[str]) -> None:
        """Remove the log (``<alloc>.log`` and ``.log.1``) and directory of each allocation that is none of
        ``current`` and was last written more than ``keep_days`` ago, then the job and namespace directories left
        empty: an allocation's log may quote its customer's prompts, and each start of the platform makes new
        allocations (a deleted agent's are kept no longer than its tasks' records)."""
        cutoff = time.time() - self._keep_s
        for job_dir in self._alloc_dir.glob("*/*"):
            if not job_dir.is_dir():
                continue
            allocs: dict[str, list[Path]] = defaultdict(list)
            for entry in job_dir.iterdir():
                allocs[entry.name.split(".", 1)[0]].append(entry)
            for alloc_id, entries in allocs.items():
                try:
                    if alloc_id in current or max(_last_written(e) for e in entries) > cutoff:
                        continue
                    for entry in entries:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
                except OSError as exc:  # (one that changed meanwhile) looked at again next time
                    log.warning("allocation %s of %s not collected: %s", alloc_id, job_dir.name, exc)
                    continue
                log.info(
                    "allocation %s of %s collected: last written over %g days ago",
                    alloc_id,
                    job_dir.name,
                    self._keep_s / 86_400,
                )
            for empty in (job_dir, job_dir.parent):
                with contextlib.suppress(OSError):  # not empty
                    empty.rmdir()

    def _logs_over_limit(self, running: list[tuple[_Alloc, asyncio.subprocess.Process]]) -> list[Path]:
        """The logs of the ``running`` tasks past :data:`LOG_MAX_BYTES` (a stat each: the copy is made in a
        thread)."""
        over = []
        for alloc, _ in running:
            path = self.log_path(alloc)
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size > self._log_max_bytes:
                    over.append(path)
        return over

    def _enforce_memory(self, running: list[tuple[_Alloc, asyncio.subprocess.Process]]) -> None:
        if not running:
            return
        table = _process_table()
        children: dict[int, list[int]] = defaultdict(list)
        for pid, (ppid, _) in table.items():
            children[ppid].append(pid)
        for alloc, proc in running:
            rss = _tree_rss(proc.pid, children, table)
            if rss > alloc.job.spec.memory_mb * 2**20 and proc.returncode is None:
                alloc.oom = f"OOM killed: memory {rss / 2**20:.0f} MB over the limit of {alloc.job.spec.memory_mb} MB"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


async def _http_check(host: str, port: int, path: str, limit_s: float) -> tuple[bool, str]:
    """Nomad's ``http`` check: GET the path, passing on a 2xx status. A bare request on a fresh connection,
    as the check needs no more: an HTTP client library cost the control plane six times the CPU per check."""
    what = f"HTTP GET http://{host}:{port}{path}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            status_line = await reader.readline()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return False, f"{what}: not an HTTP response"
        status = int(parts[1])
        return 200 <= status < 300, f"{what}: {status}"
    except (OSError, TimeoutError) as exc:
        return False, f"{what}: {type(exc).__name__}"
    finally:
        if writer is not None:
            writer.close()


def _rotate_log(path: Path, limit: int) -> None:
    """A log's last ``limit`` bytes (from a line's start) go to ``<log>.1``, replacing what was there, and the log
    starts again empty. Its task goes on writing to it (at its end: it appends); what the task writes between the two
    may be lost, as with logrotate's copytruncate."""
    size = path.stat().st_size
    with path.open("rb") as current:
        current.seek(size - limit)
        kept = current.read(limit)
    start = kept.find(b"\n") + 1
    written = path.with_name(path.name + ".1.new")
    with open(os.open(written, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as previous:
        previous.write(kept[start:] if 0 < start < len(kept) else kept)
    written.replace(path.with_name(path.name + ".1"))  # whole, for whoever reads it
    os.truncate(path, 0)


def _last_written(path: Path) -> float:
    """When ``path`` (a file, or a directory and everything in it) was last written."""
    if not path.is_dir():
        return path.stat().st_mtime
    return max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*") if not p.is_symlink())])


def _tree_rss(pid: int, children: dict[int, list[int]], table: dict[int, tuple[int, int]]) -> int:
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += table.get(current, (0, 0))[1]
        todo.extend(children.get(current, ()))
    return total


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, resident bytes) of every process. On Linux one read of /proc/<pid>/stat each, which
    holds both: a third of what psutil's iteration costs, and no second read per process for its memory."""
    if not _PROC_STAT:
        table: dict[int, tuple[int, int]] = {}
        for process in psutil.process_iter(["pid", "ppid", "memory_info"]):
            memory = process.info["memory_info"]
            table[process.info["pid"]] = (process.info["ppid"], memory.rss if memory else 0)
        return table
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                raw = stat.read()
            # after "pid (comm) ": state ppid pgrp ... with rss (in pages) the 22nd field from the state on
            fields = raw[raw.rindex(b")") + 2 :].split()
            table[int(name)] = (int(fields[1]), int(fields[21]) * _PAGE_SIZE)
        except (OSError, ValueError, IndexError):  # gone meanwhile, not ours to read, or cut short
            continue
    return table


def _base_env() -> dict[str, str]:
    """What a task inherits from the machine: PATH, locale and the like. Secrets are not: a task gets only its own
    model's key (:func:`model_key_secret`), and the scheduler's ``task_secrets``."""
    keep = (
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "TMPDIR",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "SSL_CERT_FILE",
        "CARAVAN_EVENT_LOOP",  # debugging switches (README: configuration)
        "CARAVAN_FAST_READ",
    )
    return {k: v for k, v in os.environ.items() if k in keep}
