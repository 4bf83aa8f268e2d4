"""The web page: ``/`` and its two assets, plain HTML/CSS/JS from ``app/static``.

The page holds no data and works through the public API from the browser, so it is served
without an API key (:data:`PUBLIC_PATHS`): it is where a user types the key in. Every call
the page makes to the API carries the key as ``X-API-Key``; thumbnails are fetched the same
way and shown through object URLs, so access control stays on the image routes.

Assets are a fixed list, never a path taken from the request, so nothing but these three
files can be read through these routes. Responses carry a Content-Security-Policy that
only allows the page's own script and style, and the service's own images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import ProblemError

#: Asset file name → media type. The only files these routes serve besides index.html.
ASSETS: Final[dict[str, str]] = {
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
}
#: Paths of the page and its assets: open without an API key.
PUBLIC_PATHS: Final[tuple[str, ...]] = ("/", *(f"/static/{name}" for name in ASSETS))

CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # blob: thumbnails fetched with the API key; data: the empty favicon.
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "form-action 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)
#: Headers of every page response. ``no-cache`` revalidates (ETag) on each load, so an
#: upgraded service never runs a stale script against a newer API.
PAGE_HEADERS: Final[dict[str, str]] = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


def static_dir() -> Path:
    """Folder of the page's files (installed with the package as package data)."""
    return Path(__file__).resolve().parent.parent / "static"


def _file(name: str, media_type: str, *, csp: bool = False) -> FileResponse:
    path = static_dir() / name
    if not path.is_file():
        # A broken installation, not a client error: say which file is missing.
        raise ProblemError(500, "web_asset_missing", f"the web page file {name} is not installed")
    headers = dict(PAGE_HEADERS)
    if csp:
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return FileResponse(path, media_type=media_type, headers=headers)


@router.get("/", response_class=FileResponse)
def index_page() -> FileResponse:
    """The search page."""
    return _file("index.html", "text/html; charset=utf-8", csp=True)


@router.get("/static/{name}", response_class=FileResponse)
def asset(name: str) -> FileResponse:
    """One of the page's :data:`ASSETS`; any other name is a 404 problem."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ProblemError(404, "not_found", f"no web asset named {name!r}")
    return _file(name, media_type)
