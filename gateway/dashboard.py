"""The dashboard: static HTML, CSS and JavaScript modules from ``gateway/static``, served at ``/dashboard``.

Only the files found there when the app is built are served, by name (no directory listing, no path that could
leave the folder), each with a strict Content-Security-Policy: the page runs its own scripts and styles and
nothing else, talks only to this origin and may not be framed. The page calls the API as any client does, with
a bearer token; these routes need none and are left out of the OpenAPI schema.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response

from gateway.errors import error_response

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "MEDIA_TYPES",
    "PATH",
    "SECURITY_HEADERS",
    "STATIC_DIR",
    "build_router",
    "serve_file",
]

PATH = "/dashboard"
STATIC_DIR = Path(__file__).parent / "static"
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",  # the API, its event streams (fetch) too; CSP 3's 'self' covers this host's ws/wss
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",  # forms are sent by the scripts: a form the browser sends itself could put a key in a URL
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {  # of the files that may be served (the dashboard's and the API docs')
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",  # the icon: without one the browser asks for /favicon.ico, a 404 in its console
    ".png": "image/png",
}


def _files(directory: Path) -> dict[str, Path]:
    """The files that may be served, by name: those of a known type directly in ``directory``."""
    if not directory.is_dir():
        return {}
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file() and p.suffix in MEDIA_TYPES}


def serve_file(files: dict[str, Path], name: str, headers: dict[str, str], where: str = "the dashboard") -> Response:
    """The file called ``name`` among ``files`` (by name only: no path), with ``headers``; else a 404."""
    path = files.get(name)
    if path is None:
        return error_response(404, "not_found", f"no such file in {where}", None, headers)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=headers)


def build_router(directory: Path = STATIC_DIR) -> APIRouter:
    """The routes of the dashboard: ``/`` redirects to it; the files of ``directory`` as they are when it is built."""
    files = _files(directory)
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse(PATH, status_code=307)

    @router.get(PATH)
    async def index() -> Response:
        return serve_file(files, "index.html", SECURITY_HEADERS)

    @router.get(PATH + "/{name}")
    async def static_file(name: str) -> Response:
        return serve_file(files, name, SECURITY_HEADERS)

    return router
