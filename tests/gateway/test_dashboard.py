"""The dashboard (``/dashboard``): served with a strict Content-Security-Policy, only its own files (nothing else
under or above the folder), no inline code, and JavaScript that calls only routes the API has, writes API data as
text, keeps no key and evaluates no code."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.dashboard import CONTENT_SECURITY_POLICY, STATIC_DIR
from tests.conftest import Api, make_settings
from tests.gateway.test_agents_api import REPLAY, created_running
from tests.support.helpers import sse_events

SCRIPTS = sorted(STATIC_DIR.glob("*.js"))
CALL = re.compile(r"""\bapi\(\s*"(GET|POST|PUT|PATCH|DELETE)"\s*,\s*(["`])(/[^"`]*)\2""")
HTML_SINKS = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|createContextualFragment|srcdoc")
CODE_FROM_TEXT = re.compile(r"\beval\s*\(|\bnew\s+Function\b|\bFunction\s*\(|set(?:Timeout|Interval)\(\s*[\"'`]")
IMPORT = re.compile(r"""\bfrom\s+["']([^"']+)["']|\bimport\s*\(\s*["']([^"']+)["']|\bimport\s+["']([^"']+)["']""")


def source(path: Path) -> str:
    """A script without its comments (a comment may name what the code must not do)."""
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    return re.sub(r"(?m)^\s*//.*$|(?<=[;,{}()\s])//[^\"'`\n]*$", "", text)


async def raw_get(base: str, target: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``target`` exactly as written (an HTTP client would resolve its dot segments before sending it)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


POLICY = {  # what the page relies on, directive by directive
    "default-src": ["'self'"],
    "script-src": ["'self'"],  # no inline code, no eval
    "style-src": ["'self'"],
    "img-src": ["'self'"],
    "object-src": ["'none'"],  # no plugin
    "base-uri": ["'none'"],  # no <base> to send the relative script URLs elsewhere
    "form-action": ["'none'"],  # no form the browser sends itself (a key in a URL)
    "frame-ancestors": ["'none'"],  # no framing (X-Frame-Options too, for older browsers)
}


def assert_secured(headers: Mapping[str, str]) -> None:
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    directives = [d.strip().split(" ") for d in CONTENT_SECURITY_POLICY.split(";")]
    policy = {name: sources for name, *sources in directives}
    assert len(policy) == len(directives), "a directive given twice (a browser reads the first only)"
    for name, sources in POLICY.items():
        assert policy.get(name) == sources, name
    assert policy["connect-src"][0] == "'self'"
    assert all(s == "'self'" or re.fullmatch(r"wss?://[^\s;*]+", s) for s in policy["connect-src"])
    assert not any("unsafe" in s or s == "*" or s.endswith(":") for sources in policy.values() for s in sources)
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-frame-options"] == "DENY"


async def test_the_dashboard_is_served_with_a_strict_policy_and_the_root_leads_to_it(api: Api) -> None:
    page = await api.client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>Caravan dashboard</title>" in page.text
    assert_secured(page.headers)

    root = await api.client.get("/", follow_redirects=False)
    assert root.status_code in (302, 303, 307, 308) and root.headers["location"] == "/dashboard"

    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
    files = [p for p in STATIC_DIR.iterdir() if p.suffix in types]
    assert {p.suffix for p in files} == set(types)
    for path in files:
        served = await api.client.get(f"/dashboard/{path.name}")
        assert served.status_code == 200, path.name
        assert served.headers["content-type"] == types[path.suffix], path.name
        assert served.content == path.read_bytes()
        assert_secured(served.headers)
    missing = await api.client.get("/dashboard/no-such-file.js")  # an answer the dashboard gives that is no file
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert_secured(missing.headers)

    # the API is untouched: no dashboard header on it, and the dashboard stays out of its schema
    assert (await api.client.get("/docs")).status_code == 200
    listed = await api.client.get("/v1/agents", headers=await api.admin())
    assert listed.status_code == 200 and "content-security-policy" not in listed.headers
    paths = (await api.client.get("/openapi.json")).json()["paths"]
    assert not any(p == "/" or p.startswith("/dashboard") for p in paths)


TRAVERSALS = [
    "/dashboard/../pyproject.toml",
    "/dashboard/../../pyproject.toml",
    "/dashboard/..%2fpyproject.toml",
    "/dashboard/..%2f..%2fpyproject.toml",
    "/dashboard/%2e%2e/pyproject.toml",
    "/dashboard/%2e%2e%2fpyproject.toml",
    "/dashboard/%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/dashboard/..%5c..%5cpyproject.toml",
    "/dashboard/..%252f..%252fpyproject.toml",
    "/dashboard%2f..%2f..%2fpyproject.toml",
    "/dashboard/../dashboard.py",
    "/dashboard/..%2fdashboard.py",
    "/dashboard/%2fetc%2fpasswd",
    "/dashboard//etc/passwd",
    "/dashboard/..",
    "/dashboard/%2e%2e",
    "/dashboard/.",
    "/dashboard/app.js%00",
    "/dashboard/APP.JS",
    "/dashboard/no-such-file.js",
]
SERVED_404 = {"/dashboard/app.js%00", "/dashboard/APP.JS", "/dashboard/no-such-file.js"}  # names the dashboard answers


async def test_only_the_dashboard_files_are_served_never_a_listing_nor_a_file_outside(api: Api) -> None:
    status, headers, body = await raw_get(api.base, "/dashboard/app.js")
    assert status == 200 and body == (STATIC_DIR / "app.js").read_bytes()
    secrets = [b"[build-system]", b"import ", b"root:"]  # pyproject.toml, a Python module, /etc/passwd
    for target in TRAVERSALS:
        status, headers, body = await raw_get(api.base, target)
        assert status == 404, (target, status, body[:200])
        assert not any(s in body for s in secrets), target
        if headers.get("content-type") == "application/json":
            assert set(json.loads(body)["error"]) == {"code", "message", "details"}
        if target in SERVED_404:
            assert_secured(headers)
    status, headers, body = await raw_get(api.base, "/dashboard/")  # no listing: back to the page
    assert status in (307, 308) and headers["location"].endswith("/dashboard")
    assert b"app.js" not in body


async def test_dashboard_requests_count_by_route_template_in_the_metrics(api: Api) -> None:
    assert (await api.client.get("/dashboard/probe-5c1e.js")).status_code == 404
    assert (await api.client.get("/dashboard")).status_code == 200
    metrics = (await api.client.get("/metrics")).text
    assert 'route="/dashboard/{name}",status="404"' in metrics
    assert 'route="/dashboard",status="200"' in metrics
    assert "probe-5c1e" not in metrics


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.references: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "style":
            self.inline.append("<style>")
        if tag == "script" and not values.get("src"):
            self.inline.append("<script> without src")
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.inline.append(f"{tag} {name}={value!r}")
            if name in ("src", "href") and value and value.startswith("javascript:"):
                self.inline.append(f"{tag} {name}={value!r}")
        for name in ("src", "href"):
            value = values.get(name)
            if value and tag in ("script", "link", "img"):  # data: too: the policy allows no data: image
                self.references.append(value)


async def test_the_page_has_no_inline_code_and_references_only_files_that_are_served(api: Api) -> None:
    page = _Page()
    page.feed((STATIC_DIR / "index.html").read_text())
    assert page.inline == []
    assert "/dashboard/app.js" in page.references and "/dashboard/style.css" in page.references
    # its own icon: without one a browser asks for /favicon.ico, and the 404 is an error in its console
    assert "/dashboard/favicon.svg" in page.references
    references = set(page.references)
    for script in SCRIPTS:
        for match in IMPORT.finditer(source(script)):
            specifier = next(group for group in match.groups() if group)
            assert specifier.startswith("./") and specifier.endswith(".js"), (script.name, specifier)
            references.add("/dashboard/" + specifier.removeprefix("./"))
    for reference in sorted(references):
        assert reference.startswith("/dashboard/"), f"{reference}: not one of the dashboard's own files"
        response = await api.client.get(reference)
        assert response.status_code == 200, reference
    served = {"/dashboard/" + p.name for p in SCRIPTS}
    assert served <= references, f"modules nothing loads: {served - references}"


def test_every_call_the_javascript_makes_is_a_route_of_the_api(tmp_path: Path) -> None:
    """The dashboard cannot drift from the API: each ``api(method, path)`` is an operation of the schema."""
    operations = {
        (method.upper(), path)
        for path, item in create_app(make_settings("nats://127.0.0.1:1", tmp_path)).openapi()["paths"].items()
        for method in item
    }
    calls: set[tuple[str, str]] = set()
    for script in SCRIPTS:
        text = source(script)
        found = CALL.findall(text)
        every_call = re.findall(r"(?<!function )\bapi\(", text)
        assert len(found) == len(every_call), f"{script.name}: an api() call without a literal method and path"
        for method, _, path in found:
            template = re.sub(r"\$\{[^}]*\}", "{}", path.split("?")[0])
            calls.add((method, template))
        if script.name != "api.js":
            assert not re.search(r"\bfetch\(|XMLHttpRequest|WebSocket|EventSource", text), script.name
    assert len(calls) >= 25  # the dashboard covers the API: agents, teams, tasks, usage, admin
    normalised = {(method, re.sub(r"\{[^}]*\}", "{}", path)) for method, path in operations}
    assert calls - normalised == set(), f"calls to routes the API does not have: {sorted(calls - normalised)}"
    for needed in [("POST", "/v1/auth/token"), ("GET", "/v1/tasks/{}/events"), ("POST", "/v1/admin/killswitch")]:
        assert needed in calls


def test_the_javascript_writes_text_keeps_no_key_and_evaluates_no_code() -> None:
    assert SCRIPTS, "no JavaScript in gateway/static"
    stored: list[str] = []
    for script in SCRIPTS:
        text = source(script)
        assert not HTML_SINKS.search(text), f"{script.name} writes HTML: use textContent (dom.js el/fill)"
        assert "localStorage" not in text and "document.cookie" not in text, script.name
        assert not CODE_FROM_TEXT.search(text), f"{script.name} evaluates text as code"
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{script.name} names another site"
        stored += re.findall(r"sessionStorage\.setItem\(([^;]*)\);", text)
    # one write, of the session object signIn() builds: its token, role, subject, customer and expiry (the node
    # test below checks what is stored, run)
    assert stored == ["SESSION_KEY, JSON.stringify(session)"]
    built = re.search(
        r"\n  const session = \{\n(.*?)\n  \};\n  sessionStorage\.setItem", source(STATIC_DIR / "api.js"), re.S
    )
    assert built, "api.js: signIn() no longer builds the session it stores as this test reads it"
    assert re.findall(r"(?m)^\s*(\w+):", built[1]) == ["token", "role", "subject", "customerId", "expiresAt"]
    assert not re.search(r"apiKey|api_key", built[1])
    style = (STATIC_DIR / "style.css").read_text()
    assert not re.search(r"@import|url\(", style), "the stylesheet loads nothing else"


LINKS = """
import { readFileSync, readdirSync } from "node:fs";
const dir = new URL(process.argv[2] + "/");
const missing = [];
for (const file of readdirSync(dir).filter((f) => f.endsWith(".js"))) {
  const text = readFileSync(new URL(file, dir), "utf8");
  for (const [, names, from] of text.matchAll(/import\\s*\\{([^}]*)\\}\\s*from\\s*"\\.\\/([^"]+)"/g)) {
    const namespace = await import(new URL(from, dir));  // app.js, which starts the page, is imported by none
    for (const name of names.split(",").map((n) => n.trim().split(/\\s+as\\s+/)[0]).filter(Boolean)) {
      if (!(name in namespace)) missing.push(`${file} imports ${name} from ${from}, which does not export it`);
    }
  }
}
console.log(JSON.stringify(missing));
"""
NO_NODE = "node is not installed: the JavaScript modules are not run (their syntax is not checked)"


@pytest.mark.skipif(shutil.which("node") is None, reason=NO_NODE)
def test_node_parses_every_module(tmp_path: Path) -> None:
    assert SCRIPTS, "no JavaScript in gateway/static"
    for script in SCRIPTS:
        module = tmp_path / (script.stem + ".mjs")  # as an ES module, whatever node takes a .js file for
        module.write_text(script.read_text())
        checked = subprocess.run(["node", "--check", str(module)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, f"{script.name}: {checked.stderr}"
    linker = tmp_path / "links.mjs"  # what --check leaves out: each name a module imports, its module exports
    linker.write_text(LINKS)
    linked = subprocess.run(["node", str(linker), STATIC_DIR.as_uri()], capture_output=True, text=True, timeout=60)
    assert linked.returncode == 0, linked.stderr
    assert json.loads(linked.stdout) == []


FOLLOW = """
import { api, currentSession, signIn } from "STATIC/api.js";
import { followTask } from "STATIC/sse.js";

const [base, key, agentId] = process.argv.slice(2);
const store = new Map();
globalThis.sessionStorage = {
  getItem: (k) => (store.has(k) ? store.get(k) : null),
  setItem: (k, v) => store.set(k, String(v)),
  removeItem: (k) => store.delete(k),
};
const requests = [];
let cut = false;
const realFetch = globalThis.fetch;
globalThis.fetch = async (path, init) => {
  requests.push({ path, headers: init.headers });
  const response = await realFetch(base + path, init);
  if (cut || !path.endsWith("/events") || response.status !== 200) return response;
  cut = true; // the first stream breaks after its first event with an id: the client has to resume
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let seen = "";
  const body = new ReadableStream({
    async pull(controller) {
      // a pull that returns without enqueueing is not called again: read on until there is something to give
      for (;;) {
        const { value, done } = await reader.read();
        if (done) {
          if (seen) controller.enqueue(new TextEncoder().encode(seen));
          return controller.close();
        }
        seen += decoder.decode(value, { stream: true });
        const first = seen.match(/^[^]*?\\nid: [0-9a-f]+\\n[^]*?\\n\\n/);
        if (first) {
          controller.enqueue(new TextEncoder().encode(first[0]));
          await reader.cancel();
          return controller.close();
        }
      }
    },
  });
  return new Response(body, { status: 200, headers: response.headers });
};

await signIn(key);
const task = await api("POST", "/v1/tasks", { body: { agent_id: agentId, task: "What is 6 times 7?" } });
const events = [];
const states = [];
const how = await followTask(task.id, {
  onEvent: (e) => events.push(e),
  onState: (s) => states.push(s),
  signal: new AbortController().signal,
});
const session = currentSession();
const stored = [...store.values()];
console.log(JSON.stringify({ task: task.id, how, events, states, requests, stored, role: session.role }));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason=NO_NODE)
async def test_the_dashboards_client_signs_in_and_follows_a_task_to_its_end_across_a_broken_stream(
    api: Api, tmp_path: Path
) -> None:
    """api.js and sse.js, run by node against the API: the token (not the key) kept, the events read with the
    bearer token, a stream broken after its first event resumed with Last-Event-ID, no event twice, the end seen."""
    created = await api.client.post("/v1/admin/customers", json={"name": "watcher"}, headers=await api.admin())
    key = created.json()["api_key"]
    headers = await api.token(key)
    agent = await created_running(api, headers, model={**REPLAY, "responses": ["42"]})
    script = tmp_path / "follow.mjs"
    script.write_text(FOLLOW.replace("STATIC", STATIC_DIR.as_uri()))
    ran = await asyncio.to_thread(
        subprocess.run, ["node", str(script), api.base, key, agent["id"]], capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)

    assert out["how"] == "ended" and out["role"] == "customer"
    assert not any(key in value for value in out["stored"])
    statuses = [e["content"] for e in out["events"] if e["kind"] == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "completed"
    assert any(e["kind"] == "message" and e["content"] == "42" for e in out["events"])
    ids = [e["id"] for e in out["events"]]
    whole = await sse_events(api.client, f"/v1/tasks/{out['task']}/events", headers)  # read again, unbroken
    assert ids == [e["id"] for e in whole], "an event came twice, out of order or not at all"
    streams = [r for r in out["requests"] if r["path"].endswith("/events")]
    assert len(streams) >= 2, "the broken stream was not resumed"
    assert "Last-Event-ID" not in streams[0]["headers"]
    assert streams[1]["headers"]["Last-Event-ID"] == ids[0]
    assert all(r["headers"]["Authorization"].startswith("Bearer ") for r in streams)
    assert all(key not in r["path"] and "token=" not in r["path"] for r in out["requests"])
