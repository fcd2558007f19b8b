"""``/docs``: the API reference comes entirely from this service (no CDN), so it works offline."""

from __future__ import annotations

import re
from typing import Any

from litestar.testing import AsyncTestClient

EXPECTED = {
    "swagger-ui-bundle.js": ("text/javascript", b"SwaggerUIBundle"),
    "swagger-ui.css": ("text/css", b".swagger-ui"),
    "init.js": ("text/javascript", b"SwaggerUIBundle({"),
}


async def test_docs_loads_only_same_origin_assets_and_they_are_served(client: AsyncTestClient[Any]) -> None:
    r = await client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "connect-src 'self'" in csp
    page = r.text
    assert "://" not in page and "//" not in page.replace("<!doctype", ""), "an absolute or protocol-relative URL"
    urls = re.findall(r'<(?:script|link)\b[^>]*?\b(?:src|href)="([^"]*)"', page)
    assert "<script>" not in page and "<style" not in page, "inline code: the CSP allows only same-origin files"
    loaded = [u for u in urls if not u.startswith("data:")]
    assert sorted(u.rsplit("/", 1)[1] for u in loaded) == sorted(EXPECTED)
    for url in loaded:
        assert url.startswith("/docs/assets/"), url
        asset = await client.get(url)
        media_type, marker = EXPECTED[url.rsplit("/", 1)[1]]
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type), url
        assert marker in asset.content, url
        assert url.endswith("init.js") or len(asset.content) > 100_000, url  # Swagger UI's build, not a stub
    # the page names the document it renders, and that is served too
    spec_url = re.search(r'data-url="([^"]+)"', page)
    assert spec_url is not None and spec_url.group(1) == "/docs/openapi.json"
    assert (await client.get(spec_url.group(1))).json()["info"]["title"] == "Outbox Relay"
    assert (await client.get("/docs/assets/swagger-editor-bundle.js")).status_code == 404  # only what the page needs
