"""The browser playground: one static page at `/` (Classify, Search, Compare) and its assets under
`/playground/`, all served from this package (no CDN, no build step).

The page is public, like `/docs`: it holds no data and calls the API with the key the user types, which it
keeps in `sessionStorage` only. The server tells the page two things through attributes on `<body>`: whether
it needs a key and whether it fetches image URLs, so the page only offers what will work.

Search results show `metadata.thumbnail` (a small `data:image/...` URL) when an item has one, since the
collections API stores embeddings and metadata, not images; `clipserve demo` stores thumbnails that way.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from clipserve.api.deps import server_state

STATIC_DIR = Path(__file__).parent / "static"
PAGE_TEMPLATE = Path(__file__).with_name("index.html")
ASSETS_PATH = "/playground"
PAGE_PATH = "/"

# Everything from this server; images may also be data:/blob: (previews, thumbnails) or an image URL the
# user typed (previewed by the browser, fetched for the model by the server under its own policy).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob: http: https:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def mount_playground(app: FastAPI) -> None:
    """Serve the playground page at `/` and its assets under `/playground/` on `app`."""
    template = PAGE_TEMPLATE.read_text(encoding="utf-8")

    async def playground_page(request: Request) -> HTMLResponse:
        settings = server_state(request).settings
        page = template.replace("{{auth}}", "none" if settings.auth.no_auth else "required").replace(
            "{{url_fetch}}", "enabled" if settings.fetch.enabled else "disabled"
        )
        return HTMLResponse(
            page, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"}
        )

    app.add_api_route(PAGE_PATH, playground_page, methods=["GET"], include_in_schema=False)
    app.mount(ASSETS_PATH, StaticFiles(directory=STATIC_DIR), name="playground")


__all__ = ["ASSETS_PATH", "PAGE_PATH", "mount_playground"]
