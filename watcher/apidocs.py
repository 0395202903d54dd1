"""`/docs`: /openapi.json rendered for people by Swagger UI, served from the files the
`swagger-ui-py` package ships, so the page loads nothing from another origin (no CDN: the
API listener is often on a machine without a way out, and a CDN would see who reads it).
"""

from __future__ import annotations

import importlib.util
import mimetypes
from pathlib import Path

from aiohttp import web

from .openapi import Operation

# The Swagger UI files the page uses; nothing else of the package is served.
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")

# No inline script, nothing from another origin. Swagger UI sets inline styles and shows
# images as data: URLs; `validatorUrl: null` keeps it from asking validator.swagger.io.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>watcher API</title>
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
<noscript>This page needs JavaScript; the same description is at
<a href="/openapi.json">/openapi.json</a>.</noscript>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/assets/watcher-docs.js"></script>
</body>
</html>
"""

INIT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    tryItOutEnabled: false,
    presets: [SwaggerUIBundle.presets.apis]
  });
});
"""


def swagger_ui_dir() -> Path:
    """Where the installed swagger-ui-py keeps its static files. Found without importing the
    package (its import loads jinja2 and more for handlers the watcher does not use: a third
    of a second of start-up)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the swagger-ui-py package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def _headers(content_type: str) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "public, max-age=3600",
    }


def add_docs_routes(app: web.Application) -> None:
    """GET /docs (the page) and GET /docs/assets/{name} (its scripts and styles), open like
    /openapi.json. The assets are read once, at start: a missing file fails the start, not a reader."""
    folder = swagger_ui_dir()
    files = {name: (folder / name).read_bytes() for name in ASSETS}
    files["watcher-docs.js"] = INIT.encode()
    page = PAGE.encode()

    async def docs(request: web.Request) -> web.Response:
        return web.Response(body=page, headers=_headers("text/html; charset=utf-8"))

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound(text=f"no asset {name!r}")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        return web.Response(body=files[name], headers=_headers(kind))

    app.router.add_get("/docs", docs)
    app.router.add_get("/docs/assets/{name}", asset)


OPERATIONS = [
    Operation(
        "GET",
        "/docs",
        "This API description rendered for people (Swagger UI, served from the package)",
        {200: ("text/html", {"type": "string"})},
        auth=False,
        tags=("operations",),
    ),
    Operation(
        "GET",
        "/docs/assets/{name}",
        "The scripts and styles of /docs",
        {200: ("application/octet-stream", {"type": "string"})},
        auth=False,
        tags=("operations",),
        problems=(404,),
    ),
]
