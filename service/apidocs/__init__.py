"""The API reference at ``/docs``: Swagger UI, its assets served by this service from a pinned package.

The page loads nothing from another origin (no CDN, no fonts, no validator badge), so it works
offline and on a network that reaches only this service, and its Content-Security-Policy allows
only same-origin scripts: the start-up code is a file here (``init.js``), not an inline script.
The assets are Swagger UI's own build as the ``swagger-ui-py`` package ships it; only the files the
page needs are served, read once at start-up.
"""

from __future__ import annotations

import html
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from litestar import Request, Response, Router, get
from litestar.datastructures import ResponseHeader
from litestar.openapi.plugins import OpenAPIRenderPlugin
from litestar.params import FromPath

HERE = Path(__file__).resolve().parent
ASSETS_PATH = "/assets"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
"""Swagger UI sets style attributes on its elements (hence 'unsafe-inline' for styles only)."""
DOCS_HEADERS = [
    ResponseHeader(name="Content-Security-Policy", value=CSP),
    ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
    ResponseHeader(name="Referrer-Policy", value="same-origin"),
]


def swagger_ui_dir() -> Path:
    """Where the installed ``swagger-ui-py`` keeps Swagger UI's build (found without importing it)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or spec.origin is None:
        raise RuntimeError("the API reference needs the swagger-ui-py package (the server extra)")
    return Path(spec.origin).parent / "static"


def _assets() -> dict[str, tuple[bytes, str]]:
    ui = swagger_ui_dir()
    files = {
        "swagger-ui.css": (ui / "swagger-ui.css", "text/css"),
        "swagger-ui-bundle.js": (ui / "swagger-ui-bundle.js", "text/javascript"),
        "init.js": (HERE / "init.js", "text/javascript"),
    }
    return {name: (path.read_bytes(), media_type) for name, (path, media_type) in files.items()}


class LocalSwaggerPlugin(OpenAPIRenderPlugin):
    """Swagger UI from this service's own ``<openapi path>/assets/``; registers the asset route."""

    def __init__(self, *, path: str | Sequence[str] = "/swagger", **kwargs: Any) -> None:
        super().__init__(path=path, favicon='<link rel="icon" href="data:,">', **kwargs)
        self.assets = _assets()

    def asset_url(self, request: Request[Any, Any, Any], name: str) -> str:
        base = self.get_openapi_json_route(request).rsplit("/", 1)[0]
        return f"{base}{ASSETS_PATH}/{name}"

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        title = html.escape(str(openapi_schema["info"]["title"]))
        spec_url = html.escape(self.get_openapi_json_route(request))
        css, bundle, init = (html.escape(self.asset_url(request, n)) for n in self.assets)
        return f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{title} · API reference</title>
  {self.favicon}
  <link rel="stylesheet" href="{css}">
  <script src="{bundle}" defer></script>
  <script src="{init}" defer></script>
</head>
<body>
  <noscript>The API reference needs JavaScript; the document is at <a href="{spec_url}">{spec_url}</a>.</noscript>
  <div id="swagger-ui" data-url="{spec_url}"></div>
</body>
</html>
""".encode()

    def receive_router(self, router: Router) -> None:
        assets = self.assets

        @get(f"{ASSETS_PATH}/{{name:str}}", include_in_schema=False, sync_to_thread=False, name="docs-asset")
        def asset(name: FromPath[str]) -> Response[bytes]:
            found = assets.get(name)
            if found is None:
                return Response(b"not found", status_code=404, media_type="text/plain")
            body, media_type = found
            return Response(body, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})

        router.register(asset)
