"""``/docs``: Swagger UI on the OpenAPI document, served from the installed package.

The Swagger UI files come from the ``swagger-ui-bundle`` wheel (Apache-2.0) and are
served by the service itself, so the page works on a machine with no internet access and
its Content-Security-Policy can stay ``'self'``. The page stays behind the API key like
the document it shows; its assets are third-party library code holding no data, so they
are public (:data:`PUBLIC_PATHS`), as the web page's are.

Assets are a fixed list, never a path taken from the request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, HTMLResponse

from app.api.web import PAGE_HEADERS, static_dir
from app.errors import ProblemError
from app.security import require_api_key

#: Asset name → media type: the Swagger UI files the page needs, and its start-up script.
ASSETS: Final[dict[str, str]] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",
}
#: The page's assets: open without an API key.
PUBLIC_PATHS: Final[tuple[str, ...]] = tuple(f"/docs/assets/{name}" for name in ASSETS)

CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        # Swagger UI (React) sets style attributes on its elements.
        "style-src 'self' 'unsafe-inline'",
        # Its icons are inline SVG data URIs.
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)

# Relative URLs, so the page also works behind a path prefix.
PAGE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/assets/docs.js"></script>
</body>
</html>
"""

router = APIRouter(include_in_schema=False)


def swagger_ui_dir() -> Path:
    """Folder of the Swagger UI distribution files of the installed ``swagger-ui-bundle``."""
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


def _asset_path(name: str) -> Path:
    return static_dir() / name if name == "docs.js" else swagger_ui_dir() / name


@router.get("/docs", dependencies=[Depends(require_api_key)])
def docs_page() -> HTMLResponse:
    """Swagger UI for the service's API."""
    headers = {**PAGE_HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY}
    title = "ConVIRT chest X-ray retrieval — API"
    return HTMLResponse(PAGE.format(title=title), headers=headers)


@router.get("/docs/assets/{name}", response_class=FileResponse)
def docs_asset(name: str) -> FileResponse:
    """One of :data:`ASSETS`; any other name is a 404 problem."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ProblemError(404, "not_found", "no such documentation asset")
    path = _asset_path(name)
    if not path.is_file():
        raise ProblemError(500, "web_asset_missing", f"the API page file {name} is not installed")
    return FileResponse(path, media_type=media_type, headers=dict(PAGE_HEADERS))
