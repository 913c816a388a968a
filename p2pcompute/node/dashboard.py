"""The node's own web page: the login by one-time code, the page and its assets (shipped in the package, nothing
from the internet), the live updates (server-sent events) and the ledger download. Its data is the JSON API's."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from importlib import resources
from typing import AsyncIterator, Callable, TextIO

from aiohttp import web

from p2pcompute.node.control_server import ControlServer, refusal_response
from p2pcompute.node.web_auth import SESSION_TTL

logger = logging.getLogger(__name__)

FEED_PERIOD = 2.0  # seconds between live updates: charts move at the pace of epochs (seconds), and it keeps CPU low
MAX_EVENT_STREAMS = 16  # pages open at once; each costs a socket and a write per update
MAX_LOGIN_CODE = 100  # characters; codes are 43
EXPORT_SPOOL_BYTES = 8 << 20  # an export is built in memory up to this size, on disk beyond it
EXPORT_CHUNK = 64 << 10  # bytes per write of a download
# path -> (file in p2pcompute/node/static, content type)
ASSETS = {
    "/": ("dashboard.html", "text/html"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript"),
    "/static/dashboard.css": ("dashboard.css", "text/css"),
}
EXPORT_FORMATS = {"jsonl": "application/x-ndjson", "csv": "text/csv"}


class LiveFeed:
    """One snapshot every `period` seconds while at least one page listens, serialised once and written to every
    page: the cost of a snapshot does not grow with the number of pages, and nothing is computed without one."""

    def __init__(self, snapshot: Callable[[], dict], run_blocking, period: float = FEED_PERIOD):
        self._snapshot, self._run_blocking, self.period = snapshot, run_blocking, period
        self.subscribers = 0
        self._latest = b""
        self._version = 0
        self._changed: asyncio.Condition | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    async def stream(self) -> AsyncIterator[bytes]:
        """Server-sent events: the newest snapshot at once (if any), then each new one."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        self.subscribers += 1
        if self._task is None:
            self._task = asyncio.ensure_future(self._produce())
        seen = 0
        try:
            while True:
                async with self._changed:
                    await self._changed.wait_for(lambda: self._version != seen or self._closed)
                if self._closed:
                    return
                seen = self._version
                yield self._latest
        finally:
            self.subscribers -= 1

    async def _produce(self) -> None:
        try:
            while self.subscribers > 0 and not self._closed:
                try:
                    data = await self._run_blocking(self._snapshot)
                except Exception as e:  # say so on the page; the next update may work
                    logger.exception("live update failed")
                    data = {"error": f"{type(e).__name__}: {e}"}
                self._latest = b"event: snapshot\ndata: " + json.dumps(data, default=str).encode() + b"\n\n"
                async with self._changed:
                    self._version += 1
                    self._changed.notify_all()
                await asyncio.sleep(self.period)
        finally:
            self._task = None

    async def close(self) -> None:
        self._closed = True
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()
        if self._task is not None:
            self._task.cancel()


class Dashboard:
    """Mounts the page on a ControlServer: `/login?code=` (public), `/` and its assets, `GET /api/session`,
    `GET /api/events`, `GET /api/ledger/export`. `live()` makes one live update; `export(fmt, sink)` writes the
    ledger (ledger/views.py)."""

    def __init__(self, control: ControlServer, live: Callable[[], dict],
                 export: Callable[[str, TextIO], None]):
        self.control = control
        self.feed = LiveFeed(live, control.run_blocking)
        self._export = export
        self._assets = {path: (resources.files("p2pcompute.node").joinpath("static", name).read_bytes(), kind)
                        for path, (name, kind) in ASSETS.items()}

    def mount(self) -> "Dashboard":
        control = self.control
        control.add_route("GET", "/login", self.login, public=True)
        for path in self._assets:
            control.add_route("GET", path, self.asset)
        control.add_route("GET", "/api/session", self.session)
        control.add_route("GET", "/api/events", self.events)
        control.add_route("GET", "/api/ledger/export", self.export)
        control.app.on_shutdown.append(lambda _app: self.feed.close())
        return self

    async def login(self, request: web.Request) -> web.Response:
        """Exchange a one-time code for a session cookie (HttpOnly, SameSite=Strict) and go to the page."""
        code = request.query.get("code", "")
        found = self.control.auth.login(code) if 0 < len(code) <= MAX_LOGIN_CODE else None
        if found is None:
            return refusal_response(request, 401, "this login link is used or expired: run `p2pc node dashboard` again")
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(self.control.auth.cookie_name, found[0], httponly=True, samesite="Strict", path="/",
                            max_age=int(SESSION_TTL))
        return response

    async def asset(self, request: web.Request) -> web.Response:
        body, kind = self._assets[request.path]
        return web.Response(body=body, content_type=kind, charset="utf-8")

    async def session(self, request: web.Request) -> web.Response:
        """What the page needs to send requests that change state: its CSRF token ("" for the bearer token)."""
        return web.json_response({"result": {"csrf": request["caller"].csrf, "kind": request["caller"].kind}})

    async def events(self, request: web.Request) -> web.StreamResponse:
        if self.feed.subscribers >= MAX_EVENT_STREAMS:
            return refusal_response(request, 503, f"over {MAX_EVENT_STREAMS} live pages open; close one")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        try:
            await response.write(b"retry: 3000\n\n")  # the browser reconnects after 3 s if the node restarts
            async for event in self.feed.stream():
                await response.write(event)
        except ConnectionError:  # the page went away
            pass
        return response

    async def export(self, request: web.Request) -> web.StreamResponse:
        """The whole replica as JSON lines or CSV (`p2pc ledger export`), as a download."""
        fmt = request.query.get("format", "jsonl")
        if fmt not in EXPORT_FORMATS:
            return refusal_response(request, 400, f"format must be one of {', '.join(EXPORT_FORMATS)}")
        spool = tempfile.SpooledTemporaryFile(max_size=EXPORT_SPOOL_BYTES, mode="w+", encoding="utf-8", newline="")
        try:
            await self.control.run_blocking(self._export, fmt, spool)
            spool.seek(0)
            response = web.StreamResponse(headers={
                "Content-Type": f"{EXPORT_FORMATS[fmt]}; charset=utf-8",
                "Content-Disposition": f'attachment; filename="ledger.{fmt}"'})
            await response.prepare(request)
            while chunk := await self.control.run_blocking(spool.read, EXPORT_CHUNK):
                await response.write(chunk.encode())
            await response.write_eof()
            return response
        finally:
            spool.close()
