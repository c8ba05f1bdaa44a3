"""The API's documentation pages, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), from files served by the gateway.

FastAPI's own pages load their scripts from a public CDN and start them with an inline script: any script on this
origin can read the dashboard's token from ``sessionStorage``, and the pages did not work offline. These pages load
only files of this origin: Swagger UI's and ReDoc's bundles as the ``fastapi-offline`` package ships them, and a
small start script of ours each (``gateway/docs_ui``), under a Content-Security-Policy as strict as the dashboard's
(:func:`content_security_policy` says where it is not). The schema stays ``/openapi.json``; these routes are left out
of it. The pages have no OAuth2 redirect page: the API's one scheme is a bearer token, given in Authorize.
"""

from __future__ import annotations

import html
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from gateway.dashboard import MEDIA_TYPES, serve_file
from gateway.dashboard import SECURITY_HEADERS as DASHBOARD_HEADERS

__all__ = [
    "ASSETS_PATH",
    "CONTENT_SECURITY_POLICY",
    "DOCS_PATH",
    "REDOC_PATH",
    "SECURITY_HEADERS",
    "build_router",
    "content_security_policy",
]

DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
ASSETS_PATH = "/docs/assets"


def content_security_policy(redoc: bool = False) -> str:
    """The pages' policy: this origin's files only, no inline script. ReDoc's (``redoc``) also allows inline styles
    (ReDoc styles its page with ``<style>`` elements and ``style`` attributes it writes as it renders, some before
    any nonce could reach it) and a worker made from a ``blob:`` by its own script (its search): neither runs
    anything from elsewhere."""
    styles = "'self' 'unsafe-inline'" if redoc else "'self'"
    workers = ["worker-src blob:"] if redoc else []
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            f"style-src {styles}",
            "img-src 'self' data:",  # Swagger UI's stylesheet draws icons as data: URLs
            "connect-src 'self'",  # the schema, and the requests of "Try it out"
            *workers,
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


CONTENT_SECURITY_POLICY = content_security_policy()
SECURITY_HEADERS = {**DASHBOARD_HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY}
REDOC_HEADERS = {**SECURITY_HEADERS, "Content-Security-Policy": content_security_policy(redoc=True)}
_OURS = Path(__file__).parent / "docs_ui"
_VENDORED = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def _assets() -> dict[str, Path]:
    """The files served under :data:`ASSETS_PATH`, by name: the vendored bundles and our start scripts."""
    vendor = Path(str(files("fastapi_offline") / "static"))
    found = {name: vendor / name for name in _VENDORED}
    found |= {p.name: p for p in sorted(_OURS.iterdir()) if p.suffix in MEDIA_TYPES}
    missing = [name for name, path in found.items() if not path.is_file()]
    if missing:
        raise RuntimeError(f"the API docs' files are missing: {', '.join(missing)} (reinstall fastapi-offline)")
    return found


def _page(title: str, root_id: str, openapi_url: str, assets: str, styles: list[str], scripts: list[str]) -> str:
    """The page: the stylesheets and scripts of ``assets``, and an element ``root_id`` naming the schema."""
    e = html.escape
    links = "".join(f'\n<link rel="stylesheet" href="{e(assets)}/{e(name)}">' for name in styles)
    tags = "".join(f'\n<script src="{e(assets)}/{e(name)}"></script>' for name in scripts)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<link rel="icon" href="{e(assets)}/favicon.png">{links}
</head>
<body>
<div id="{e(root_id)}" data-openapi-url="{e(openapi_url)}"></div>{tags}
</body>
</html>
"""


def build_router(title: str, openapi_url: str) -> APIRouter:
    """``/docs``, ``/redoc`` and their files, for the API called ``title`` whose schema is at ``openapi_url``."""
    assets = _assets()
    router = APIRouter(include_in_schema=False)

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "")
        return root + openapi_url, root + ASSETS_PATH

    @router.get(DOCS_PATH)
    async def swagger_ui(request: Request) -> HTMLResponse:
        scripts = ["swagger-ui-bundle.js", "swagger-init.js"]
        text = _page(f"{title} - Swagger UI", "swagger-ui", *urls(request), ["swagger-ui.css"], scripts)
        return HTMLResponse(text, headers=SECURITY_HEADERS)

    @router.get(REDOC_PATH)
    async def redoc(request: Request) -> HTMLResponse:
        scripts = ["redoc.standalone.js", "redoc-init.js"]
        text = _page(f"{title} - ReDoc", "redoc", *urls(request), ["redoc.css"], scripts)
        return HTMLResponse(text, headers=REDOC_HEADERS)

    @router.get(ASSETS_PATH + "/{name}")
    async def asset(name: str) -> Response:
        return serve_file(assets, name, SECURITY_HEADERS, "the API docs")

    return router
