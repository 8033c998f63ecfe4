"""`GET /ui`: the web dashboard, static files served as they are committed (no build step).

The page keeps the token in the tab's sessionStorage and sends it as a bearer header, on its
API calls and on the event stream alike (read with `fetch`, not `EventSource`, which cannot send
headers), so the token never appears in a URL, a server log or the browser's history.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

UI = Path(__file__).with_name("ui")


class _UiFiles(StaticFiles):
    """The dashboard's files, never cached stale: the browser revalidates each load (ETag)."""

    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def add_routes(app: FastAPI) -> None:
    app.mount("/ui", _UiFiles(directory=UI, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/ui/")
