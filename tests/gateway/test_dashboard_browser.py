"""The dashboard in a real browser (headless Chromium through Playwright) against the gateway on a real port, with
real agent processes on the scripted ``replay`` model: what a customer and an operator do, checked on what the page
shows, with no console error, no uncaught exception and no Content-Security-Policy violation on the way."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.async_api import Browser, Locator, Page, Route, async_playwright, expect

from agent.protocol import Event
from control.backends.base import SchedulerError, SubmitResult
from control.errors import StoreUnavailable
from tests.conftest import ADMIN_KEY, Api
from tests.gateway.teams_support import TERMINAL, script, task_status
from tests.gateway.test_agents_api import wait_status
from tests.support.browser import CHROMIUM_ARGS, NO_CHROMIUM, PageWatch, chromium_path
from tests.support.helpers import assert_eventually, now

CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
expect.set_options(timeout=20_000)  # an agent process starts in a few seconds; every wait is for what the page shows


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Dashboard:
    page: Page
    watch: PageWatch
    api: Api

    async def sign_in(self, key: str) -> None:
        await self.page.goto(self.api.base + "/dashboard")
        await self.page.get_by_label("API key").fill(key)
        await self.page.get_by_role("button", name="Sign in").click()
        await expect(self.page.locator("#who")).to_be_visible()

    async def tab(self, name: str) -> None:
        await self.page.locator("#tabs").get_by_role("button", name=name, exact=True).click()

    def row(self, text: str) -> Locator:
        """The table row that shows ``text``."""
        return self.page.locator("tr", has_text=text)


@contextlib.asynccontextmanager
async def opened(browser: Browser, api: Api) -> AsyncIterator[Dashboard]:
    """A page of a browser context of its own (another user's tab: its own sessionStorage), watched."""
    context = await browser.new_context()
    watch = await PageWatch.attach(context)
    try:
        yield Dashboard(await context.new_page(), watch, api)
    finally:
        await context.close()


@pytest.fixture
async def dashboard(browser: Browser, api: Api) -> AsyncIterator[Dashboard]:
    async with opened(browser, api) as page:
        yield page


@pytest.fixture
def late_records(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task records take a second longer to have a task's end than its event stream (a busy tracker): a page
    that reads the record as the stream ends finds the task still going."""
    tasks = api.control.tasks
    fold = tasks._fold

    async def late(key: str, events: list[tuple[Any, Event]]) -> None:
        if any(event.kind == "status" and event.content in TERMINAL for _, event in events):
            await asyncio.sleep(1.0)
        await fold(key, events)

    monkeypatch.setattr(tasks, "_fold", late)


async def new_customer(api: Api, name: str) -> tuple[str, str, dict[str, str]]:
    """A customer made through the API: its id, API key and auth headers."""
    created = await api.client.post("/v1/admin/customers", json={"name": name}, headers=await api.admin())
    assert created.status_code == 201, created.text
    body = created.json()
    return body["id"], body["api_key"], await api.token(body["api_key"])


async def new_agent(api: Api, headers: dict[str, str], name: str, model: dict[str, Any]) -> str:
    """An agent made through the API (not waited for: it starts while the page is used)."""
    created = await api.client.post(
        "/v1/agents", json={"name": name, "system_message": f"You are {name}.", "model": model}, headers=headers
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def status_of(where: Locator) -> Locator:
    return where.locator(".badge").first


def cell(row: Locator, index: int) -> Locator:
    return row.locator("td").nth(index)


async def ended(dashboard: Dashboard, watcher: Locator, task_id: str, status: str) -> None:
    """The open task has ended ``status``: its list row says so too, and its view stays so, with no Cancel."""
    await expect(status_of(dashboard.row(task_id))).to_have_text(status)
    await expect(watcher.get_by_role("status")).to_have_text("ended")
    await expect(status_of(watcher)).to_have_text(status)
    await expect(watcher.get_by_role("button", name="Cancel task")).to_be_hidden()


async def start_task_in_form(dashboard: Dashboard, watcher: Locator, after: str, text: str, **choice: str) -> str:
    """Start a task from the form on the target ``choice`` names (``value=`` or ``label=``); once the view shows
    it in place of task ``after`` ("": of none), its id."""
    page = dashboard.page
    await page.locator("select[name=target]").select_option(**choice)
    await page.get_by_label("Task", exact=True).fill(text)
    await page.get_by_role("button", name="Start", exact=True).click()
    await expect(watcher.locator("h2")).not_to_have_text(f"Task {after}")
    return (await watcher.locator("h2").inner_text()).removeprefix("Task ")


async def test_the_browser_reports_what_the_policy_refuses(dashboard: Dashboard) -> None:
    """The watch this file relies on sees a violation: an inline script the policy refuses."""
    await dashboard.page.goto(dashboard.api.base + "/dashboard")
    await expect(dashboard.page.get_by_role("button", name="Sign in")).to_be_visible()
    inline = "const s = document.createElement('script'); s.textContent = 'window.ran = 1'; document.body.append(s)"
    await dashboard.page.evaluate(f"() => {{ {inline} }}")
    problems = dashboard.watch.problems
    await assert_eventually(now(lambda: problems), lambda p: any(t.startswith("CSP: script-src") for t in p))
    assert await dashboard.page.evaluate("() => window.ran") is None


@pytest.mark.usefixtures("late_records")
async def test_a_customer_creates_agents_and_a_team_and_follows_their_tasks(dashboard: Dashboard) -> None:
    api, page = dashboard.api, dashboard.page
    customer_id, key, headers = await new_customer(api, "acme")
    handoff = {"tool": "transfer_to_user", "arguments": {}}
    asker = await new_agent(api, headers, "asker", script("What colour should it be?", handoff, "a3", "a4"))
    maker = await new_agent(api, headers, "maker", script("m1", "m2", "m3"))
    slow = await new_agent(api, headers, "slow", script("late", delay_ms=60_000))

    await page.clock.install()  # the page's timers, to move its 5 s refreshes on instead of waiting for them
    await dashboard.sign_in(key)
    await expect(page.locator("#who-text")).to_have_text(f"customer {customer_id}")

    # an agent from the form: first refused (a scripted model needs its answers), the refusal shown field by field
    await dashboard.tab("Agents")
    await page.get_by_text("New agent").click()
    await page.get_by_label("Name (letters, digits, _)").fill("helper")
    dashboard.watch.allow(r"status of 422 .*/v1/agents\)$")
    await page.get_by_role("button", name="Create agent").click()
    refusal = page.locator("form .error")
    await expect(refusal).to_contain_text("422 invalid: invalid request")
    why = "model: provider 'replay' needs at least one entry in responses"
    await expect(refusal.locator("li")).to_have_text([why])
    await expect(refusal).not_to_contain_text('"type"')
    await page.get_by_label("Scripted responses").fill("The answer is 42.")
    await page.get_by_role("button", name="Create agent").click()
    await expect(page.locator(".notice")).to_contain_text("Agent helper created")
    await expect(dashboard.row("helper")).to_contain_text("replay / scripted")
    helper = (await api.client.get("/v1/agents", headers=headers)).json()
    helper_id = next(a["id"] for a in helper if a["name"] == "helper")

    # a team from the form, whose first member asks the human
    await dashboard.tab("Teams")
    await page.get_by_text("New team").click()
    await page.get_by_label("Name", exact=True).fill("painters")
    await page.get_by_label(f"asker ({asker})").check()
    await page.get_by_label(f"maker ({maker})").check()
    await page.get_by_label("Max messages").fill("5")
    await page.get_by_label("Stop when a member hands off to the user").check()
    await page.get_by_label("Handoffs (JSON)").fill(f'{{"{asker}": ["user"]}}')
    await page.get_by_role("button", name="Create team").click()
    await expect(page.locator(".notice")).to_contain_text("Team painters created")
    await expect(dashboard.row("painters")).to_contain_text("asker → maker")
    # and one whose speakers a model selects: the selector's model fields show for that mode only
    selector_fields = page.locator("form .fields", has=page.get_by_label("Model provider"))
    await page.get_by_label("Name", exact=True).fill("pair")
    await expect(selector_fields).to_be_hidden()
    await page.locator("select[name=mode]").select_option("selector")
    await expect(selector_fields).to_be_visible()
    await page.get_by_label(f"asker ({asker})").uncheck()  # the form keeps the last team's choices
    await page.get_by_label(f"maker ({maker})").uncheck()
    await page.get_by_label(f"helper ({helper_id})").check()  # then maker: in the order checked, not listed
    await page.get_by_label(f"maker ({maker})").check()
    await expect(page.get_by_text("Order: ")).to_have_text("Order: helper → maker")
    await page.get_by_label("Scripted responses").fill("maker\nhelper")
    await page.get_by_label("Max messages").fill("3")
    await page.get_by_label("Stop when a member hands off to the user").uncheck()
    await page.get_by_label("Handoffs (JSON)").fill("")
    await page.get_by_role("button", name="Create team").click()
    await expect(page.locator(".notice")).to_contain_text("Team pair created")
    await expect(dashboard.row("pair")).to_contain_text("selector")
    await expect(dashboard.row("pair")).to_contain_text("helper → maker")

    # the team's task asks; the answer resumes it to its end
    await dashboard.tab("Tasks")
    watcher = page.locator(".split > div")
    task_id = await start_task_in_form(dashboard, watcher, "", "Paint the fence.", label="painters (round_robin)")
    await expect(page.get_by_label("The task asks for your answer")).to_be_visible()
    await expect(status_of(watcher)).to_have_text("awaiting_input")
    await expect(watcher.locator(".transcript li.input_request")).to_contain_text("What colour should it be?")
    await expect(status_of(dashboard.row(task_id))).to_have_text("awaiting_input")
    await page.get_by_label("The task asks for your answer").fill("Green.")
    async with page.expect_request(lambda r: r.url.endswith(f"/v1/tasks/{task_id}/input")) as answered:
        await page.get_by_role("button", name="Send answer").click()
    # it names the question: clicked again once the team has asked anew, it is refused, not the next answer
    assert (await answered.value).post_data_json == {"content": "Green.", "segment": 1}
    await expect(watcher.locator(".transcript")).to_contain_text("Green.")
    await ended(dashboard, watcher, task_id, "completed")
    await expect(watcher.locator("pre").last).to_have_text("a4")

    # a task on the agent made in the form, streamed in
    task_id = await start_task_in_form(dashboard, watcher, task_id, "What is 6 times 7?", value=f"agent:{helper_id}")
    await expect(watcher.locator(".transcript li.message").last).to_contain_text("The answer is 42.")
    await ended(dashboard, watcher, task_id, "completed")
    await expect(watcher).to_contain_text(re.compile(r"Tokens: [1-9]\d* prompt, [1-9]\d* completion"))

    # the selector's team: its model picks maker, then helper
    task_id = await start_task_in_form(dashboard, watcher, task_id, "Take turns.", label="pair (selector)")
    await ended(dashboard, watcher, task_id, "completed")
    speakers = [re.compile(f" · {name}$") for name in ("user", "maker", "helper")]
    await expect(watcher.locator(".transcript li.message .meta")).to_have_text(speakers)
    await expect(watcher.locator("pre").last).to_have_text("The answer is 42.")

    # a slow one, cancelled
    task_id = await start_task_in_form(dashboard, watcher, task_id, "Take your time.", value=f"agent:{slow}")
    await expect(status_of(watcher)).to_have_text("running")
    await watcher.get_by_role("button", name="Cancel task").click()
    await ended(dashboard, watcher, task_id, "cancelled")
    assert dashboard.watch.dialogs == ["Cancel this task?"]  # asked first

    # what changes elsewhere shows at the next refresh: an agent stopped through the API is no longer offered as
    # running,
    maker_choice = page.locator(f"select[name=target] option[value='agent:{maker}']")
    await expect(maker_choice).to_have_text("maker (running)")
    stopped = await api.client.post(f"/v1/agents/{maker}/stop", headers=headers)
    assert stopped.status_code == 200, stopped.text
    await page.clock.fast_forward(5_000)
    await expect(maker_choice).to_have_text("maker (stopped)")
    # (a task for it is refused, saying why; the refusal stays through the refreshes that follow)
    await page.locator("select[name=target]").select_option(value=f"agent:{maker}")
    await page.get_by_label("Task", exact=True).fill("Are you there?")
    dashboard.watch.allow(r"status of 409 .*/v1/tasks\)$")
    await page.get_by_role("button", name="Start", exact=True).click()
    refused = page.locator("form", has_text="Start a task").locator(".error")
    await expect(refused).to_contain_text(f"409 conflict: agent {maker} is stopped; start it before giving it tasks")
    # and a task started and ended elsewhere shows in the list, then its end, beside the open task's own
    elsewhere = await api.client.post("/v1/tasks", json={"agent_id": slow, "task": "From a script."}, headers=headers)
    assert elsewhere.status_code == 202, elsewhere.text
    other = elsewhere.json()["id"]
    await page.clock.fast_forward(5_000)
    await expect(status_of(dashboard.row(other))).to_have_text(re.compile("^(queued|running)$"))
    assert (await api.client.post(f"/v1/tasks/{other}/cancel", headers=headers)).status_code == 202
    await task_status(api, headers, other, ("cancelled",))
    await page.clock.fast_forward(5_000)
    await expect(status_of(dashboard.row(other))).to_have_text("cancelled")
    await expect(status_of(dashboard.row(task_id))).to_have_text("cancelled")
    await expect(refused).to_contain_text("409 conflict")
    assert await page.get_by_label("Task", exact=True).input_value() == "Are you there?"

    # a page of tasks at a time: the older ones on request, still there after a refresh brings a newer one
    async def ask_helper(text: str) -> None:
        started = await api.client.post("/v1/tasks", json={"agent_id": helper_id, "task": text}, headers=headers)
        assert started.status_code == 202, started.text

    await asyncio.gather(*(ask_helper(f"Question {n}.") for n in range(25)))  # 30 tasks in all
    rows = page.locator("tbody tr")
    await page.clock.fast_forward(5_000)
    await expect(rows).to_have_count(25)
    await expect(rows.first).to_contain_text("Question ")
    await page.get_by_role("button", name="Older tasks").click()
    await expect(rows).to_have_count(30)
    await expect(rows.last).to_contain_text("Paint the fence.")
    await expect(page.get_by_role("button", name="Older tasks")).to_be_hidden()
    await ask_helper("One more.")
    await page.clock.fast_forward(5_000)
    await expect(rows.first).to_contain_text("One more.")
    await expect(rows).to_have_count(31)
    await expect(rows.last).to_contain_text("Paint the fence.")
    # the status filter lists the tasks of one status
    await page.locator("select[name=status]").select_option("cancelled")
    await expect(rows).to_have_count(2)
    await expect(rows.filter(has_text=other)).to_have_count(1)
    await page.locator("select[name=status]").select_option("")
    await expect(rows).to_have_count(25)

    await dashboard.tab("Usage")
    await expect(cell(dashboard.row("Agents"), 1)).to_have_text("4")
    await dashboard.tab("Teams")
    await dashboard.row("pair").get_by_role("button", name="Delete").click()
    await expect(dashboard.row("pair")).to_have_count(0)
    await expect(dashboard.row("painters")).to_have_count(1)
    await dashboard.tab("Agents")
    await expect(status_of(dashboard.row("helper"))).to_have_text("running")
    await dashboard.row("helper").get_by_role("button", name="Job").click()
    await expect(page.locator("section", has_text="Nomad job of helper")).to_contain_text(f'"caravan-{helper_id}"')
    await dashboard.row("slow").get_by_role("button", name="Stop").click()
    await expect(status_of(dashboard.row("slow"))).to_have_text("stopped")
    await dashboard.row("slow").get_by_role("button", name="Delete").click()
    await expect(dashboard.row("slow")).to_have_count(0)
    assert dashboard.watch.dialogs[1:] == [
        "Delete team pair? Its agents stay.",
        "Delete agent slow? Its unfinished tasks end cancelled.",
    ]

    # the session outlives a reload (this tab's sessionStorage), on the same view, and signing out forgets it
    await page.reload()
    await expect(page.locator("#who-text")).to_have_text(f"customer {customer_id}")
    await expect(page.locator("#tabs [aria-current=page]")).to_have_text("Agents")
    await expect(status_of(dashboard.row("helper"))).to_have_text("running")
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.locator("#sign-in-status")).to_have_text("Signed out.")
    assert await page.evaluate("() => sessionStorage.length") == 0
    dashboard.watch.assert_clean()


async def test_an_admin_manages_customers_and_the_killswitch_and_reads_the_audit(dashboard: Dashboard) -> None:
    api, page = dashboard.api, dashboard.page
    await page.clock.install()  # the page's timers, to move its 5 s refresh on instead of waiting for it
    await dashboard.sign_in(ADMIN_KEY)
    await expect(page.locator("#who-text")).to_contain_text("admin admin:")
    overview = page.locator("#view")
    await expect(overview).to_contain_text("No killswitch engaged.")

    # a customer, its key shown once, and its quota
    await dashboard.tab("Customers")
    await page.get_by_label("New customer's name").fill("globex")
    await page.get_by_role("button", name="Create customer").click()
    await expect(page.locator(".notice")).to_contain_text("Customer globex")
    key = await page.locator("code.secret").inner_text()
    customer_id = (await page.locator(".notice").inner_text()).split("(")[1].split(")")[0]
    await dashboard.row("globex").get_by_role("button", name="Quota & usage").click()
    await page.get_by_label("max agents").fill("3")
    await page.get_by_role("button", name="Save quota").click()
    await expect(cell(dashboard.row("Agents"), 2)).to_have_text("3")
    await page.get_by_role("button", name="Save quota").click()  # the form as it was loaded: nothing sent
    await expect(page.get_by_text("Nothing changed.")).to_be_visible()
    # and a new key for it, shown once
    await page.get_by_role("button", name="New API key").click()
    new_key = await page.locator(".notice", has_text="New API key, shown this once").locator("code.secret").inner_text()
    assert new_key.startswith("cvn_") and new_key != key

    # the killswitch for every agent: refused without a reason, asked about first, then engaged and released
    await dashboard.tab("Killswitch")
    engaged_now = page.locator("section", has_text="Engaged now")
    await expect(engaged_now).to_contain_text("No killswitch engaged.")
    await page.get_by_role("button", name="Engage").click()
    await expect(page.locator(".error")).to_contain_text("Give a reason")
    await page.get_by_label("Reason").fill("maintenance window")
    await page.get_by_role("button", name="Engage").click()
    await expect(page.locator(".notice")).to_contain_text("Engaged at scope all")
    assert len(dashboard.watch.dialogs) == 1 and "EVERY agent of EVERY customer" in dashboard.watch.dialogs[0]
    await expect(engaged_now.locator("tr", has_text="maintenance window")).to_contain_text("every agent")
    await dashboard.tab("Overview")
    await expect(page.locator(".alarm")).to_contain_text("Killswitch engaged (1)")
    await expect(page.locator(".alarm")).to_contain_text("all: maintenance window")
    await dashboard.tab("Killswitch")
    await engaged_now.get_by_role("button", name="Release").click()
    await expect(page.locator(".notice")).to_contain_text("Released at scope all")
    await expect(engaged_now).to_contain_text("No killswitch engaged.")

    # the overview refreshes itself: a flag engaged elsewhere shows at the next refresh
    await dashboard.tab("Overview")
    await expect(overview).to_contain_text("No killswitch engaged.")
    engaged = await api.client.post(
        "/v1/admin/killswitch",
        json={"scope": "customer", "customer_id": customer_id, "engaged": True, "reason": "unpaid invoice"},
        headers=await api.admin(),
    )
    assert engaged.status_code == 200, engaged.text
    await page.clock.fast_forward(5_000)
    await expect(page.locator(".alarm")).to_contain_text(f"customer {customer_id}: unpaid invoice")

    # the audit log holds each action, newest first, and its filters work
    await dashboard.tab("Audit")
    actions = page.locator("tbody tr td:nth-child(3)")
    await expect(actions.first).to_have_text("killswitch.engage")
    for action in ("killswitch.release", "customer.create", "quota.change"):
        await expect(actions.filter(has_text=action)).to_have_count(1)
    await page.get_by_label("action").fill("killswitch.engage")
    await page.get_by_role("button", name="Search").click()
    await expect(page.locator("tbody tr")).to_have_count(2)
    await expect(page.locator("tbody tr").last).to_contain_text("maintenance window")
    # a search the API refuses shows why, and no longer the records of the one before
    dashboard.watch.allow(r"status of 422 .*/v1/admin/audit\?")
    await page.get_by_label("since").fill("yesterday")
    await page.get_by_role("button", name="Search").click()
    await expect(page.locator(".error")).to_contain_text("422 invalid")
    await expect(page.locator("tbody tr")).to_have_count(0)

    # the customer's keys, the new one and the first (still valid), sign in to its views, with the quota just set
    await page.get_by_role("button", name="Sign out").click()
    await dashboard.sign_in(new_key)
    await expect(page.locator("#who-text")).to_have_text(f"customer {customer_id}")
    await page.get_by_role("button", name="Sign out").click()
    await dashboard.sign_in(key)
    await expect(page.locator("#who-text")).to_have_text(f"customer {customer_id}")
    await dashboard.tab("Usage")
    await expect(cell(dashboard.row("Agents"), 2)).to_have_text("3")

    # the session ends with its token (an hour): the page asks for the key again and keeps nothing
    await page.clock.fast_forward(3_600_000)
    ended_why = re.compile(r"^Your session (has ended|expired): sign in again\.$")  # its timer, or the next refresh
    await expect(page.locator("#sign-in-status")).to_have_text(ended_why)
    await expect(page.get_by_label("API key")).to_be_focused()
    await expect(page.locator("#view")).to_be_empty()
    assert await page.evaluate("() => sessionStorage.length") == 0
    dashboard.watch.assert_clean()


async def test_an_admin_lists_a_customers_keys_and_revokes_one(dashboard: Dashboard) -> None:
    """A customer's keys by prefix, their secrets never shown but a new key's, once; Revoke asks first: cancelled,
    nothing is revoked; confirmed but refused by the API, the page says why and the key is still listed and signs
    in; confirmed, the key signs in no more and leaves the list, and the other still signs in."""
    api, page = dashboard.api, dashboard.page
    _, key, _ = await new_customer(api, "hooli")
    prefix = key[:12]  # cvn_ and 8 hex digits: the prefix a generated key starts with
    deletes: list[str] = []  # what the page asks to revoke
    page.on("request", lambda r: deletes.append(r.url.removeprefix(api.base)) if r.method == "DELETE" else None)
    await dashboard.sign_in(ADMIN_KEY)
    await dashboard.tab("Customers")
    await dashboard.row("hooli").get_by_role("button", name="Quota & usage").click()
    first = dashboard.row(prefix)
    await expect(first.get_by_role("button", name="Revoke")).to_be_visible()
    await expect(cell(first, 1)).not_to_be_empty()  # when it was created
    keys = page.locator("table", has=page.get_by_role("columnheader", name="Prefix"))
    await expect(keys.locator("tbody tr")).to_have_count(1)

    # a new key: shown once above, listed by its prefix alone
    await page.get_by_role("button", name="New API key").click()
    new_key = await page.locator(".notice", has_text="New API key, shown this once").locator("code.secret").inner_text()
    second = dashboard.row(new_key[:12])
    await expect(second.get_by_role("button", name="Revoke")).to_be_visible()
    await expect(keys.locator("tbody tr")).to_have_count(2)
    await expect(keys).not_to_contain_text(new_key)
    await expect(page.locator("#view")).not_to_contain_text(key)

    # Revoke asks first: cancelled, nothing is sent and the key still signs in
    asked = f"Revoke API key {prefix} of hooli?\n\nIt signs in no more, and the sessions it opened end within seconds."
    dashboard.watch.dismiss_next()
    await first.get_by_role("button", name="Revoke").click()
    await assert_eventually(now(lambda: dashboard.watch.dialogs), lambda d: d == [asked])
    await page.evaluate("() => null")  # the click's handler has run on past the answer
    assert deletes == []
    await expect(keys.locator("tbody tr")).to_have_count(2)
    assert (await api.client.post("/v1/auth/token", json={"api_key": key})).status_code == 200

    # confirmed, but the API cannot revoke it now (its store does not answer): the page says why, and nothing changed
    async def store_down(route: Route) -> None:
        if route.request.method != "DELETE":
            await route.fallback()
            return
        down = StoreUnavailable()  # as the API answers it
        error = {"code": down.code, "message": down.message, "details": None}
        await route.fulfill(status=down.status, headers=down.headers, json={"error": error})

    dashboard.watch.allow(r"status of 503 .*/v1/admin/keys/")
    await page.route("**/v1/admin/keys/*", store_down)
    await first.get_by_role("button", name="Revoke").click()
    refusal = page.locator(".error")
    await expect(refusal).to_have_text(f"503 unavailable: {StoreUnavailable().message}")
    await page.unroute("**/v1/admin/keys/*", store_down)
    await expect(first.get_by_role("button", name="Revoke")).to_be_enabled()
    await expect(keys.locator("tbody tr")).to_have_count(2)
    assert (await api.client.post("/v1/auth/token", json={"api_key": key})).status_code == 200

    # confirmed again: revoked, gone from the list (counted below it), and refused a token; the other key is not;
    # the failure's message is gone
    await first.get_by_role("button", name="Revoke").click()
    await expect(first).to_have_count(0)
    await expect(refusal).to_have_count(0)
    await expect(keys.locator("tbody tr")).to_have_count(1)
    await expect(second).to_be_visible()
    await expect(page.get_by_text("1 revoked key not listed.")).to_be_visible()
    assert dashboard.watch.dialogs == [asked, asked, asked]
    assert deletes == [f"/v1/admin/keys/{prefix}"] * 2
    refused = await api.client.post("/v1/auth/token", json={"api_key": key})
    assert refused.status_code == 401, refused.text
    assert (await api.client.post("/v1/auth/token", json={"api_key": new_key})).status_code == 200
    await expect(page.locator("code.secret")).to_have_text(new_key)  # another key's revocation leaves it shown

    # the new key revoked as well: the secret shown once above goes with it
    await second.get_by_role("button", name="Revoke").click()
    await expect(page.locator("code.secret")).to_have_count(0)
    await expect(page.get_by_text("2 revoked keys not listed.")).to_be_visible()
    assert (await api.client.post("/v1/auth/token", json={"api_key": new_key})).status_code == 401
    dashboard.watch.assert_clean()


async def test_an_admin_stops_an_agent_and_its_owner_sees_why(
    browser: Browser, dashboard: Dashboard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Force stop, a broadcast and the hard killswitch from the operator's views, and what the customer's page (a
    tab of its own) shows meanwhile: its agent stopped, failed to start (the scheduler refused it once), started
    again, killed, and its start refused with why until the killswitch is released."""
    api, admin = dashboard.api, dashboard.page
    customer_id, key, headers = await new_customer(api, "initech")
    worker = await new_agent(api, headers, "worker", script("w1"))

    async with opened(browser, api) as customer:
        page = customer.page
        await admin.clock.install()  # both pages' timers, to move their 5 s refreshes on
        await page.clock.install()
        await dashboard.sign_in(ADMIN_KEY)
        await customer.sign_in(key)
        mine = customer.row("worker")  # the customer lands on its agents
        await wait_status(api, headers, worker, "running")

        # the operator's list of every agent: the customer's, force stopped (asked first)
        await dashboard.tab("Agents")
        theirs = dashboard.row("worker")
        await expect(status_of(theirs)).to_have_text("running")
        await theirs.get_by_role("button", name="Force stop").click()
        await expect(status_of(theirs)).to_have_text("stopped")
        await expect(theirs).to_contain_text("stopped by an administrator")
        await expect(theirs.get_by_role("button", name="Force stop")).to_be_disabled()
        assert dashboard.watch.dialogs == [f"Stop agent worker of {customer_id}? Its owner can start it again."]

        # its owner sees it stopped, and starts it again: the scheduler refuses once, and a failed agent may be
        # started again
        await page.clock.fast_forward(5_000)
        await expect(status_of(mine)).to_have_text("stopped")
        submit = api.control.scheduler.submit

        async def refuse(job: dict[str, Any], secrets: Mapping[str, str] | None = None) -> SubmitResult:
            monkeypatch.setattr(api.control.scheduler, "submit", submit)
            raise SchedulerError("no node has room")

        monkeypatch.setattr(api.control.scheduler, "submit", refuse)
        await mine.get_by_role("button", name="Start").click()
        await expect(status_of(mine)).to_have_text("failed")
        await expect(mine).to_contain_text("scheduler refused the job: no node has room")
        await mine.get_by_role("button", name="Start").click()
        await wait_status(api, headers, worker, "running")
        await page.clock.fast_forward(5_000)
        await expect(status_of(mine)).to_have_text("running")

        # a broadcast to every running agent
        await dashboard.tab("Killswitch")
        sent = admin.locator("section", has_text="Broadcast")
        await sent.get_by_label("Message to every running agent").fill("Maintenance at noon.")
        await sent.get_by_role("button", name="Broadcast").click()
        await expect(sent.locator(".notice")).to_have_text("Sent to 1 running agent.")

        # the hard killswitch on the customer: its agent's job stopped, its start refused with why
        emergency = admin.locator("section", has_text="Emergency stop")
        await admin.get_by_label("Scope").select_option("customer")
        await admin.get_by_label("Customer id").fill(customer_id)
        await admin.get_by_label("Reason").fill("fraud check")
        await admin.get_by_label(re.compile("^Hard")).check()
        await admin.get_by_role("button", name="Engage").click()
        done = emergency.locator(".notice")
        await expect(done).to_contain_text(f"Engaged at scope customer {customer_id}: 1 of 1 agent acknowledged")
        await expect(done).to_contain_text(f"Jobs stopped: {worker}")
        engaged_now = admin.locator("section", has_text="Engaged now")
        await expect(engaged_now.locator(".alarm")).to_contain_text(f"customer {customer_id} (hard): fraud check")
        await page.clock.fast_forward(5_000)
        await expect(status_of(mine)).to_have_text("killed")
        await expect(mine).to_contain_text("killswitch: fraud check")
        customer.watch.allow(rf"status of 409 .*/v1/agents/{worker}/start\)$")
        await mine.get_by_role("button", name="Start").click()
        refusal = page.locator(".error")
        await expect(refusal).to_contain_text("409 killswitch_engaged")
        await expect(refusal).to_contain_text(f"a hard killswitch is engaged on customer {customer_id} (fraud check)")
        await expect(status_of(mine)).to_have_text("killed")

        # released: the owner may start it again
        await engaged_now.locator("tr", has_text="fraud check").get_by_role("button", name="Release").click()
        await expect(done).to_contain_text(f"Released at scope customer {customer_id}")
        await expect(engaged_now).to_contain_text("No killswitch engaged.")
        await mine.get_by_role("button", name="Start").click()
        await expect(refusal).to_have_count(0)
        await expect(status_of(mine)).to_have_text(re.compile("^(pending|starting|running)$"))
        customer.watch.assert_clean()
    assert len(dashboard.watch.dialogs) == 1  # engaging for one customer did not ask
    dashboard.watch.assert_clean()


async def test_the_api_docs_render_and_try_a_request_with_nothing_from_elsewhere(dashboard: Dashboard) -> None:
    """/docs and /redoc share the dashboard's origin: they render from the gateway's own files, break no rule of
    their policy, and Swagger UI's Authorize and Try it out reach the API with a token."""
    page, api = dashboard.page, dashboard.api
    _, headers = await api.new_customer("reader")
    left: list[str] = []  # requests for another site's files that the page's policy did not refuse
    ours = (api.base, "blob:" + api.base)
    blocked = ("csp", "net::ERR_BLOCKED_BY_CSP")
    page.on("requestfinished", lambda r: None if r.url.startswith(ours) else left.append(r.url))
    page.on("requestfailed", lambda r: None if r.url.startswith(ours) or r.failure in blocked else left.append(r.url))

    await page.goto(api.base + "/docs")
    operation = page.locator("#operations-agents-list_agents_v1_agents_get")
    await expect(operation).to_be_visible()
    await page.get_by_role("button", name="Authorize").first.click()
    await page.locator(".auth-container input").first.fill(headers["Authorization"].removeprefix("Bearer "))
    await page.locator(".auth-container button.authorize").click()
    await expect(page.get_by_role("heading", name="Authorized")).to_be_visible()
    await page.get_by_role("button", name="Close").first.click()
    await operation.locator(".opblock-summary").click()
    await operation.get_by_role("button", name="Try it out").click()
    await operation.get_by_role("button", name="Execute").click()
    await expect(operation.locator(".live-responses-table tr.response .response-col_status").first).to_have_text("200")
    assert await page.evaluate("Object.keys(localStorage)") == []  # the token stayed in the page's memory

    dashboard.watch.allow(r"cdn\.redoc\.ly/redoc/logo-mini\.svg")  # the one file ReDoc asks of its makers: refused
    await page.goto(api.base + "/redoc")
    await expect(page.get_by_role("heading", name="Caravan (0.1.0)")).to_be_visible()
    await expect(page.get_by_role("heading", name=re.compile("List Agents")).first).to_be_visible()
    assert left == [], left
    dashboard.watch.assert_clean()
