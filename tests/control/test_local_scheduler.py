"""The local scheduler runs the task of a rendered job and supervises it as Nomad would."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import PROVIDER_KEY_ENV
from control.backends.base import AllocState, JobNotOwned, JobRejected, ServiceInstance, StatusUpdate
from control.backends.local import LocalScheduler
from control.jobspec import MODEL_KEY_META
from jobs import SECOND_NS, AgentJobVariables, render_agent_job
from tests.support.helpers import assert_eventually


def job(
    script: str,
    *,
    memory_mb: int = 256,
    attempts: int = 2,
    kill_timeout_s: float = 2.0,
    owner: str = "caravan",
    count: int = 1,
    env: dict[str, str] | None = None,
    meta: dict[str, str] | None = None,
) -> dict[str, Any]:
    return render_agent_job(
        AgentJobVariables(
            job_id="caravan-ag-0000000000aa",
            namespace="caravan-cu-0000000000aa",
            count=count,
            cpu=100,
            memory_mb=memory_mb,
            driver_config={"command": sys.executable, "args": ["-c", script]},
            env={"CARAVAN_AGENT_ID": "ag-0000000000aa", "CARAVAN_HEALTH_PORT": "${NOMAD_PORT_health}", **(env or {})},
            meta={
                "caravan_owner": owner,
                "caravan_agent": "ag-0000000000aa",
                "caravan_customer": "cu-0000000000aa",
                **(meta or {}),
            },
            service_name="caravan-agent-ag-0000000000aa",
            restart_attempts=attempts,
            restart_delay_ns=SECOND_NS // 10,
            kill_timeout_ns=int(kill_timeout_s * SECOND_NS),
        )
    )


class Recorder:
    def __init__(self) -> None:
        self.updates: list[StatusUpdate] = []

    async def __call__(self, update: StatusUpdate) -> None:
        self.updates.append(update)

    def states(self) -> list[AllocState]:
        return [u.state for u in self.updates]

    async def last(self) -> StatusUpdate | None:
        return self.updates[-1] if self.updates else None


@pytest.fixture
async def scheduler(tmp_path: Path) -> AsyncIterator[tuple[LocalScheduler, Recorder]]:
    recorder = Recorder()
    async with LocalScheduler(tmp_path / "allocs") as sched:
        sched.on_status(recorder)
        yield sched, recorder


SLEEPER = "import time\nwhile True: time.sleep(0.1)"


async def test_runs_the_task_with_its_environment_and_stops_it_with_sigterm(scheduler, tmp_path: Path) -> None:
    sched, rec = scheduler
    out = tmp_path / "env.json"
    script = (
        "import json, os, signal, sys, time\n"
        f"json.dump(dict(os.environ), open({str(out)!r}, 'w'))\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(out)!r} + '.term', 'w').write('bye'), sys.exit(0)))\n"
        "while True: time.sleep(0.05)\n"
    )
    result = await sched.submit(job(script))
    assert result.job_id == "caravan-ag-0000000000aa" and len(result.alloc_ids) == 1
    await assert_eventually(rec.last, lambda u: u is not None and u.state is AllocState.RUNNING, what="running")
    env = await assert_eventually(
        lambda: asyncio.to_thread(lambda: json.loads(out.read_text()) if out.exists() and out.stat().st_size else None),
        lambda e: e is not None,
    )
    assert env["CARAVAN_AGENT_ID"] == "ag-0000000000aa"
    assert env["CARAVAN_HEALTH_PORT"].isdigit() and env["CARAVAN_HEALTH_PORT"] == env["NOMAD_PORT_health"]
    assert env["NOMAD_ALLOC_ID"] == result.alloc_ids[0]

    await sched.stop_job("caravan-cu-0000000000aa", "caravan-ag-0000000000aa")
    assert (tmp_path / "env.json.term").read_text() == "bye"
    assert rec.states()[-1] is AllocState.STOPPED
    status = await sched.job_status("caravan-cu-0000000000aa", "caravan-ag-0000000000aa")
    assert status is not None and list(status.allocs.values()) == [AllocState.STOPPED]


@pytest.mark.parametrize("model_key", ["ANTHROPIC_API_KEY", None])
async def test_a_task_gets_its_own_models_key_and_no_other_and_the_debugging_switches(
    scheduler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_key: str | None
) -> None:
    sched, _ = scheduler
    platform_keys = {name: f"secret-of-{name}" for name in PROVIDER_KEY_ENV.values()}
    for name, value in platform_keys.items():
        monkeypatch.setenv(name, value)
    switches = {"CARAVAN_EVENT_LOOP": "asyncio", "CARAVAN_FAST_READ": "0"}
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "env.json"
    script = f"import json, os, time\njson.dump(dict(os.environ), open({str(out)!r}, 'w'))\n{SLEEPER}\n"
    await sched.submit(job(script, meta={MODEL_KEY_META: model_key} if model_key else {}))
    env = await assert_eventually(
        lambda: asyncio.to_thread(lambda: json.loads(out.read_text()) if out.exists() and out.stat().st_size else None),
        lambda e: e is not None,
    )
    given = {name: value for name, value in env.items() if name in platform_keys}
    assert given == ({model_key: platform_keys[model_key]} if model_key else {})
    assert {name: env.get(name) for name in switches} == switches
    await sched.stop_job("caravan-cu-0000000000aa", "caravan-ag-0000000000aa")


async def test_a_crashing_task_is_restarted_per_policy_then_fails_with_the_exit_reason(scheduler) -> None:
    sched, rec = scheduler
    await sched.submit(job("import sys; print('boom: bad config', file=sys.stderr); sys.exit(3)", attempts=2))
    final = await assert_eventually(rec.last, lambda u: u is not None and u.state is AllocState.FAILED)
    assert final is not None and final.reason is not None
    assert "exited with code 3" in final.reason and "boom: bad config" in final.reason
    assert "restart policy exhausted" in final.reason
    assert rec.states().count(AllocState.RESTARTING) == 2
    assert rec.states().count(AllocState.RUNNING) == 3


async def test_a_task_killed_from_outside_is_reported_without_its_last_log_lines(scheduler) -> None:
    """A SIGKILL from outside (an operator, the kernel) says nothing of the task: the lines it last logged (a
    killswitch halt, a start) would read as the cause."""
    sched, rec = scheduler
    script = "import os, signal, sys\nprint('WARNING halted: killswitch engaged', file=sys.stderr, flush=True)\n"
    await sched.submit(job(script + "os.kill(os.getpid(), signal.SIGKILL)", attempts=0))
    final = await assert_eventually(rec.last, lambda u: u is not None and u.state is AllocState.FAILED)
    assert final is not None and final.reason is not None
    assert "killed by SIGKILL" in final.reason and "killswitch" not in final.reason, final.reason


async def test_a_crash_that_wrote_nothing_does_not_quote_the_run_before_it(scheduler) -> None:
    """An allocation's restarts share its log: a run that crashes without a word (SIGSEGV) is reported by its
    signal alone, not with the last lines of the run before it, which would read as its cause."""
    sched, rec = scheduler
    script = (
        "import os, signal, sys\n"
        "if not os.path.exists('ran'):\n"
        "    open('ran', 'w').close()\n"
        "    sys.exit('ValueError: the first run ended here')\n"
        "os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    await sched.submit(job(script, attempts=1))
    final = await assert_eventually(rec.last, lambda u: u is not None and u.state is AllocState.FAILED)
    assert final is not None and final.reason is not None
    first = next(u for u in rec.updates if u.state is AllocState.RESTARTING)
    assert first.reason is not None and "the first run ended here" in first.reason, first.reason
    assert final.reason.startswith("killed by SIGSEGV") and "first run" not in final.reason, final.reason


async def test_memory_over_the_limit_is_killed_and_reported_as_oom(scheduler) -> None:
    sched, rec = scheduler
    hog = "import time\nx = bytearray(300 * 2**20)\nfor i in range(0, len(x), 4096): x[i] = 1\ntime.sleep(30)"
    await sched.submit(job(hog, memory_mb=128, attempts=0))
    final = await assert_eventually(rec.last, lambda u: u is not None and u.state is AllocState.FAILED)
    assert final is not None and final.reason is not None and "OOM killed" in final.reason
    assert "limit of 128 MB" in final.reason


async def test_memory_of_a_tasks_children_counts_against_its_limit(scheduler) -> None:
    """Each process stays under the limit; together (parent and two children) they are over it."""
    sched, rec = scheduler
    hog = "x = bytearray(60 * 2**20)\nfor i in range(0, len(x), 4096): x[i] = 1\n"
    child = hog + "import time; time.sleep(30)"
    tree = (
        "import subprocess, sys, time\n"
        f"kids = [subprocess.Popen([sys.executable, '-c', {child!r}]) for _ in range(2)]\n"
        f"{hog}time.sleep(30)"
    )
    await sched.submit(job(tree, memory_mb=150, attempts=0))
    final = await assert_eventually(rec.last, lambda u: u is not None and u.state is AllocState.FAILED, within=20)
    assert final is not None and final.reason is not None and "OOM killed" in final.reason


async def test_a_task_that_ignores_sigterm_is_killed_after_kill_timeout(scheduler) -> None:
    sched, rec = scheduler
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(0.05)"
    await sched.submit(job(stubborn, kill_timeout_s=0.5))
    await assert_eventually(rec.last, lambda u: u is not None and u.state is AllocState.RUNNING)
    await asyncio.sleep(0.3)  # let the child install its handler before we signal it
    loop = asyncio.get_running_loop()
    started = loop.time()
    await sched.stop_job("caravan-cu-0000000000aa", "caravan-ag-0000000000aa")
    assert loop.time() - started >= 0.5
    assert rec.states()[-1] is AllocState.STOPPED


async def test_stats_report_the_cpu_an_allocation_uses_from_the_first_reading(scheduler) -> None:
    sched, _rec = scheduler
    await sched.submit(job("while True: pass"))
    where = ("caravan-cu-0000000000aa", "caravan-ag-0000000000aa")
    await assert_eventually(lambda: sched.alloc_stats(*where), lambda stats: len(stats) == 1)
    await assert_eventually(lambda: sched.alloc_stats(*where), lambda stats: stats[0]["cpu_percent"] > 5)


async def test_count_runs_that_many_allocations(scheduler) -> None:
    sched, _rec = scheduler
    result = await sched.submit(job(SLEEPER, count=3))
    assert len(set(result.alloc_ids)) == 3
    await assert_eventually(
        lambda: sched.job_status("caravan-cu-0000000000aa", "caravan-ag-0000000000aa"),
        lambda s: s is not None and set(s.allocs.values()) == {AllocState.RUNNING},
    )


async def test_resubmitting_replaces_the_allocation_with_a_new_version(scheduler) -> None:
    sched, _ = scheduler
    first = await sched.submit(job(SLEEPER))
    second = await sched.submit(job(SLEEPER))
    assert second.version == first.version + 1 and set(second.alloc_ids).isdisjoint(first.alloc_ids)
    status = await sched.job_status("caravan-cu-0000000000aa", "caravan-ag-0000000000aa")
    assert status is not None and set(status.allocs) == set(second.alloc_ids)


async def test_refuses_jobs_it_does_not_own_and_drivers_it_cannot_run(scheduler) -> None:
    sched, _ = scheduler
    with pytest.raises(JobNotOwned):
        await sched.submit(job(SLEEPER, owner="someone-else"))
    docker = job(SLEEPER)
    docker["TaskGroups"][0]["Tasks"][0]["Driver"] = "docker"
    with pytest.raises(JobRejected, match="raw_exec"):
        await sched.submit(docker)
    assert await sched.job_status("caravan-cu-0000000000aa", "caravan-ag-0000000000aa") is None


async def test_stopping_the_scheduler_stops_every_task(tmp_path: Path) -> None:
    rec = Recorder()
    sched = LocalScheduler(tmp_path / "allocs")
    sched.on_status(rec)
    await sched.start()
    await sched.submit(job(SLEEPER, count=2))
    await assert_eventually(lambda: asyncio.sleep(0, rec.states()), lambda s: s.count(AllocState.RUNNING) == 2)
    await sched.stop()
    await sched.stop()  # idempotent
    assert rec.states().count(AllocState.STOPPED) == 2
    with pytest.raises(RuntimeError):
        await sched.start()


class Registrations:
    """A registry that keeps what the scheduler registers (the contract of control.backends.base.Registry)."""

    def __init__(self) -> None:
        self.current: dict[str, ServiceInstance] = {}

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def register(self, instance: ServiceInstance) -> None:
        self.current[instance.id] = instance

    async def set_status(self, instance: ServiceInstance) -> None:
        self.current[instance.id] = instance

    async def deregister(self, name: str, instance_id: str) -> None:
        self.current.pop(instance_id, None)

    async def instances(self, passing_only: bool = True) -> list[ServiceInstance]:
        return [i for i in self.current.values() if i.status == "passing" or not passing_only]


async def test_the_http_check_marks_the_instance_passing_then_critical(tmp_path: Path) -> None:
    """The task answers its check with 200 until told otherwise, then 503: discovery follows, with the output."""
    sick = tmp_path / "sick"
    server = (
        "import http.server, os\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        f"        self.send_response(503 if os.path.exists({str(sick)!r}) else 200); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "http.server.HTTPServer(('127.0.0.1', int(os.environ['CARAVAN_HEALTH_PORT'])), H).serve_forever()\n"
    )
    spec = job(server)
    spec["TaskGroups"][0]["Services"][0]["Checks"][0]["Interval"] = SECOND_NS  # Nomad's smallest interval
    registry = Registrations()
    async with LocalScheduler(tmp_path / "allocs", registry=registry) as sched:
        await sched.submit(spec)

        async def status() -> list[tuple[str, str]]:
            return [(i.status, i.output) for i in registry.current.values()]

        passing = await assert_eventually(status, lambda s: len(s) == 1 and s[0][0] == "passing")
        assert passing[0][1].endswith("/health: 200")
        sick.touch()
        critical = await assert_eventually(status, lambda s: s[0][0] == "critical")
        assert critical[0][1].endswith("/health: 503")
        assert len(registry.current) == 1  # a failing check marks the instance critical; it stays registered


async def test_a_start_that_fails_unexpectedly_is_a_failed_run_and_frees_its_start_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One start at a time. A start that raises something unexpected (on asyncio's own loop an environment with a
    NUL byte raises ValueError) is reported as a failed run under the restart policy, and the next job starts."""
    real = asyncio.create_subprocess_exec
    refused: list[str] = []

    async def refuse_once(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        if not refused:
            refused.append(str(args[0]))
            raise ValueError("embedded null byte")
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse_once)
    recorder = Recorder()
    async with LocalScheduler(tmp_path / "allocs", max_parallel_starts=1) as sched:
        sched.on_status(recorder)
        await sched.submit(job(SLEEPER, attempts=0))
        failed = await assert_eventually(recorder.last, lambda u: u is not None and u.state is AllocState.FAILED)
        assert failed is not None and failed.reason is not None
        assert "could not run the task: ValueError: embedded null byte" in failed.reason, failed.reason
        second = job(SLEEPER)
        second["ID"] = second["Name"] = "caravan-ag-0000000000bb"
        await sched.submit(second)
        await assert_eventually(
            recorder.last,
            lambda u: u is not None and u.job_id == "caravan-ag-0000000000bb" and u.state is AllocState.RUNNING,
            what="the next job running",
        )


async def test_an_allocations_log_is_readable_by_this_user_alone(scheduler, tmp_path: Path) -> None:
    """An agent's log quotes what its customer sent (its prompts, at debug): no other user of the machine reads
    it, under the usual umask too (022, which left it 0644)."""
    sched, rec = scheduler
    umask = os.umask(0o022)
    try:
        result = await sched.submit(job("print('hello', flush=True)\n" + SLEEPER))
        await assert_eventually(rec.last, lambda u: u is not None and u.state is AllocState.RUNNING, what="running")
    finally:
        os.umask(umask)
    log = tmp_path / "allocs" / "caravan-cu-0000000000aa" / "caravan-ag-0000000000aa" / f"{result.alloc_ids[0]}.log"
    await assert_eventually(lambda: asyncio.to_thread(log.read_text), lambda text: "hello" in text, what="logged")
    assert log.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "allocs").stat().st_mode & 0o777 == 0o700
    assert log.parent.stat().st_mode & 0o777 == 0o700


LOUD = """
import os, sys, time
log = os.path.join("..", "..", os.environ["NOMAD_ALLOC_ID"] + ".log")
lines = [b"line %05d of what the agent wrote at debug\\n" % n for n in range(4000)]
sys.stdout.buffer.write(b"".join(lines) + b"last line\\n")  # in one write: all of it, or none, before a rotation
sys.stdout.flush()
while os.path.getsize(log) > 0:  # until it is rotated
    time.sleep(0.05)
print("after the rotation", flush=True)
while True:
    time.sleep(0.1)
"""


async def test_an_allocations_log_is_kept_to_its_limit_and_as_much_again_before_it(tmp_path: Path) -> None:
    """An agent that writes much (at debug, each model call whole) does not fill the disk: past the limit its log
    starts again empty, its newest lines kept in <alloc>.log.1, and what it writes next is at the log's start."""
    limit = 16 * 1024
    async with LocalScheduler(tmp_path / "allocs", log_max_bytes=limit) as sched:
        result = await sched.submit(job(LOUD))
        log = tmp_path / "allocs" / "caravan-cu-0000000000aa" / "caravan-ag-0000000000aa" / f"{result.alloc_ids[0]}.log"

        def read() -> tuple[int, bool]:
            text = log.read_bytes() if log.exists() else b""
            return len(text), b"after the rotation" in text

        await assert_eventually(
            lambda: asyncio.to_thread(read), lambda seen: seen[1], what="a rotation (size, written after)"
        )
        assert log.read_text() == "after the rotation\n"
        before = log.with_name(log.name + ".1").read_text()
        assert len(before) <= limit
        assert before.startswith("line ")  # a whole line
        assert before.endswith("line 03999 of what the agent wrote at debug\nlast line\n")


async def test_an_allocation_directory_made_wider_before_is_narrowed_at_start(tmp_path: Path) -> None:
    """As an earlier version left it."""
    allocs = tmp_path / "allocs"
    allocs.mkdir(mode=0o755)
    async with LocalScheduler(allocs):
        assert allocs.stat().st_mode & 0o777 == 0o700


async def test_allocations_that_ended_longer_ago_than_the_retention_are_collected(tmp_path: Path) -> None:
    """An allocation's log may quote its customer's prompts, and each start of the platform makes new ones: those
    that no longer run are removed once last written more than the retention ago (a deleted agent's too), as
    Nomad collects terminal allocations; a recent one, and one given as running however old its log, are kept."""
    allocs = tmp_path / "allocs"
    old_job = allocs / "caravan-cu-0000000000aa" / "caravan-ag-0000000000aa"
    kept_job = allocs / "caravan-cu-0000000000bb" / "caravan-ag-0000000000bb"
    two_days_ago = time.time() - 2 * 86_400

    def allocation(job_dir: Path, alloc_id: str, last_written: float) -> list[Path]:
        (job_dir / alloc_id / "local").mkdir(parents=True)
        made = [job_dir / f"{alloc_id}.log", job_dir / f"{alloc_id}.log.1", job_dir / alloc_id / "local" / "x"]
        for path in made:
            path.write_text("the customer's prompt\n")
        for path in [*made, job_dir / alloc_id / "local", job_dir / alloc_id]:
            os.utime(path, (last_written, last_written))
        return made

    old = allocation(old_job, "0a1b2c3d-old", two_days_ago)
    recent = allocation(kept_job, "0a1b2c3d-recent", time.time() - 3600)
    running = allocation(kept_job, "0a1b2c3d-running", two_days_ago)
    sched = LocalScheduler(allocs, keep_days=1)
    sched._collect({"0a1b2c3d-running"})  # (what the scheduler runs: none here) as the hourly pass does
    assert [p.exists() for p in old] == [False] * 3 and not (allocs / "caravan-cu-0000000000aa").exists()
    assert all(p.exists() for p in [*recent, *running])
    async with sched:  # once as it starts: nothing runs, so the running one's old log goes now
        await assert_eventually(lambda: _exists(running[0]), lambda there: not there)
    assert all(p.exists() for p in recent)


async def _exists(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)
