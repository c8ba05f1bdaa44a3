"""The API's docs pages (``/docs``, ``/redoc``): every file they load is served by the app itself (nothing from a
CDN, and they work offline), under a Content-Security-Policy that runs this origin's scripts only, none inline."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from gateway.apidocs import ASSETS_PATH
from gateway.app import create_app
from tests.conftest import make_settings

PAGES = ["/docs", "/redoc"]
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png"}
OURS = Path(__file__).parents[2] / "gateway" / "docs_ui"
ORIGINLESS = {"'self'", "'none'", "data:", "blob:"}  # sources that name no other site


class Page(HTMLParser):
    """What a page loads (``src`` and ``href``), its ``<script>`` elements and what it would run inline."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self._in: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.urls += [value or "" for name, value in attrs if name in ("src", "href")]
        self.inline += [f"{tag} {name}" for name, _ in attrs if name.startswith("on") or name == "style"]
        if tag == "script":
            self.scripts.append(named)
        if tag in ("script", "style"):
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in and data.strip():
            self.inline.append(f"{self._in}: {data.strip()[:80]}")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection can be opened (the app is called in process: a page that needed the network fails)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a connection was opened: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
async def client(tmp_path: Path, offline: None) -> AsyncIterator[httpx.AsyncClient]:
    """The app, called in process (no control plane: the docs need none)."""
    app = create_app(make_settings("nats://127.0.0.1:1", tmp_path / "data"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://caravan.test") as c:
        yield c


def policy(headers: httpx.Headers) -> dict[str, list[str]]:
    directives = [d.strip().split() for d in headers["content-security-policy"].split(";")]
    parsed = {name: sources for name, *sources in directives}
    assert len(parsed) == len(directives), "a directive given twice (a browser reads the first only)"
    return parsed


async def test_the_pages_and_every_file_they_load_are_served_by_the_app_offline(client: httpx.AsyncClient) -> None:
    loaded: set[str] = set()
    for path in PAGES:
        page = await client.get(path)
        assert page.status_code == 200, path
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        urls = Page(page.text).urls
        assert urls and all(u.startswith(ASSETS_PATH + "/") for u in urls), urls
        loaded |= set(urls)
    for url in sorted(loaded):
        served = await client.get(url)
        assert served.status_code == 200, url
        assert served.headers["content-type"] == TYPES[Path(url).suffix], url
        assert len(served.content) > 0, url
    assert {u.rsplit("/", 1)[1] for u in loaded} >= {p.name for p in OURS.iterdir()}  # each file of ours is used
    bundle = (await client.get(ASSETS_PATH + "/swagger-ui-bundle.js")).text
    assert "SwaggerUIBundle" in bundle and "isOAS31" in bundle  # Swagger UI 5 reads OpenAPI 3.1 (4 did not)
    assert (await client.get("/openapi.json")).json()["openapi"].startswith("3.1")

    missing = await client.get(ASSETS_PATH + "/no-such-file.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    for outside in ("/docs/assets/..%2f..%2fpyproject.toml", "/docs/assets/%2e%2e", "/docs/oauth2-redirect"):
        assert (await client.get(outside)).status_code == 404, outside
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert not any(p.startswith(("/docs", "/redoc")) for p in paths)


async def test_the_pages_and_our_scripts_name_no_other_site_and_run_nothing_inline(client: httpx.AsyncClient) -> None:
    for path in PAGES:
        text = (await client.get(path)).text
        assert not re.search(r"(?i)https?:|//[a-z0-9]", text), path  # no absolute nor scheme-relative URL
        page = Page(text)
        assert page.inline == [], path
        assert page.scripts and all(s.get("src") for s in page.scripts), path
    for own in sorted(OURS.iterdir()):
        assert not re.search(r"(?i)https?://", own.read_text()), own.name


async def test_the_pages_policy_runs_this_origins_scripts_only(client: httpx.AsyncClient) -> None:
    responses = {path: await client.get(path) for path in PAGES}
    responses[ASSETS_PATH] = await client.get(ASSETS_PATH + "/swagger-init.js")
    responses["404"] = await client.get(ASSETS_PATH + "/no-such-file.js")
    for path, response in responses.items():
        rules = policy(response.headers)
        assert rules["script-src"] == ["'self'"], path  # no inline script, no eval, no other site
        assert rules["default-src"] == ["'self'"], path
        for name in ("object-src", "base-uri", "form-action", "frame-ancestors"):
            assert rules[name] == ["'none'"], (path, name)
        for name, sources in rules.items():
            for source in sources:
                inline_styles = (path, name, source) == ("/redoc", "style-src", "'unsafe-inline'")  # (below)
                assert source in ORIGINLESS or inline_styles, (path, name, source)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
    assert policy(responses["/docs"].headers)["style-src"] == ["'self'"]

    # ReDoc styles what it renders inline (scripts stay this origin's only), and searches in a worker of its own
    assert policy(responses["/redoc"].headers)["style-src"] == ["'self'", "'unsafe-inline'"]
    assert policy(responses["/redoc"].headers)["worker-src"] == ["blob:"]
