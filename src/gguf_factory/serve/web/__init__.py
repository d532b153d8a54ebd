"""The chat page at ``/``: static HTML, CSS and JavaScript shipped in this package (``static/``), nothing
fetched from elsewhere. The page talks to the same server's ``/v1`` API (models, streamed chat completions)
and sends the API key the user types, so the page itself needs none.

Every file goes out with a Content-Security-Policy that allows only this origin's own scripts, styles and
connections (no inline script or style, no ``eval``) and, in browsers that support it, Trusted Types, so
model output can only ever reach the page as text.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).with_name("static")
PREFIX = "/web"
"""URL prefix of the page's assets; the page itself is at ``/``."""

CSP = (
    "default-src 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'; form-action 'self'; "
    "require-trusted-types-for 'script'; trusted-types 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidate (ETag) so an upgraded package's page is seen at once
}


class _Static(StaticFiles):
    """Starlette's static files (ETag, Last-Modified, Range, HEAD), with the page's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def add_web_routes(app: FastAPI) -> None:
    """Serve the chat page at ``/`` and its assets under ``/web/``."""
    static = _Static(directory=STATIC_DIR)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index(request: Request) -> Response:
        return await static.get_response("index.html", request.scope)

    app.mount(PREFIX, static, name="web")
