"""The playground: GET / serves one static page (runtime/serving/static/: plain HTML, CSS and JavaScript, no build step,
nothing fetched from elsewhere, so it works on a machine without internet) where a person asks about an image and
watches the answer being denoised, from the stream's `stream_canvas` extension."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

FOLDER = Path(__file__).parent / "static"
PATHS = ("/", "/playground/*")  # what the page needs: open without an API key (the page asks for the key itself)
# The page loads only its own files and talks only to this server.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_playground(app: FastAPI) -> None:
    app.mount("/playground", StaticFiles(directory=FOLDER), name="playground")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(FOLDER / "index.html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                                             "X-Content-Type-Options": "nosniff"})
