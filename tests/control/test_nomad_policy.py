"""The ACL policy an operator gives Caravan's token (``nomad/caravan-policy.hcl``) lets it do all that it does on
Nomad. Against the Nomad double with ACLs on, whose endpoints ask each for the capability Nomad's API docs name:
no real Nomad with ACLs can be had here."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.backends.base import AllocState, SchedulerError
from control.backends.nomad import NomadConfig, NomadScheduler
from tests.control.test_nomad_scheduler import HEALTHY, Ids, Recorder, make_job
from tests.support.helpers import assert_eventually, now
from tests.support.nomad_acl import load_policy
from tests.support.nomad_double import NomadDouble, Policy

POLICY = Path(__file__).parents[2] / "nomad" / "caravan-policy.hcl"


async def test_a_token_of_the_operators_policy_runs_an_agent_through_its_life() -> None:
    """Created, planned, registered with its Variable, followed on the event stream of every namespace, read,
    measured and stopped, its Variable destroyed, with the token of ``caravan-policy.hcl`` (and a management token
    for the namespace alone, as README says). Its statuses come from the event stream, which Nomad refuses a token
    without ``read-job`` in a rule for namespace ``*`` itself."""
    ids = Ids.new()
    recorder = Recorder()
    tokens = {"caravan": load_policy(POLICY), "root": Policy(management=True)}
    with NomadDouble(tokens=tokens) as double:
        config = NomadConfig(address=double.address, token="caravan", namespace_token="root")
        async with NomadScheduler(config) as scheduler:
            scheduler.on_status(recorder)
            feed = await assert_eventually(
                now(scheduler.event_feed), lambda f: f.connected or f.failures > 0, what="the event stream answered"
            )
            assert feed.connected, feed.last_error
            plan = await scheduler.plan(make_job(ids, HEALTHY))
            assert not plan.get("FailedTGAllocs")
            result = await scheduler.submit(make_job(ids, HEALTHY))
            assert result.eval_id and result.alloc_ids
            assert (ids.namespace, f"nomad/jobs/{ids.job_id}") in double.variables
            await assert_eventually(
                lambda: recorder.last(ids.job_id),
                lambda u: u is not None and u.state is AllocState.RUNNING,
                what="running, as the event stream says",
            )
            status = await scheduler.job_status(ids.namespace, ids.job_id)
            assert status is not None and list(status.allocs.values()) == [AllocState.RUNNING]
            stats = await scheduler.alloc_stats(ids.namespace, ids.job_id)
            assert [s["alloc_id"] for s in stats] == result.alloc_ids
            await scheduler.stop_job(ids.namespace, ids.job_id)
            assert (ids.namespace, f"nomad/jobs/{ids.job_id}") not in double.variables
            assert scheduler.event_feed().connected


async def test_the_policy_lets_caravan_change_nothing_outside_its_customers_namespaces() -> None:
    """The rule for every namespace only reads: with Caravan's token, no job of another namespace can be planned,
    registered or stopped, nor its allocations touched."""
    policy = load_policy(POLICY)
    assert not policy.management
    for capability in ("submit-job", "dispatch-job", "alloc-exec", "alloc-lifecycle", "read-logs", "read-fs"):
        assert not policy.allows("default", capability), capability
    assert policy.allows("caravan-cu-0123456789ab", "submit-job")
    ids = Ids.new()
    job = make_job(ids, HEALTHY)
    job["Namespace"] = "default"
    with NomadDouble(tokens={"caravan": policy}) as double:
        async with NomadScheduler(NomadConfig(address=double.address, token="caravan")) as scheduler:
            with pytest.raises(SchedulerError, match="Permission denied"):
                await scheduler.submit(job)
        assert not double.jobs and not double.variables
