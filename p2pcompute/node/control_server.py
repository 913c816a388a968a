"""The node's control API server: HTTP on 127.0.0.1 only (aiohttp on a private event loop), JSON handlers under
/api/ and the routes others mount (node/dashboard.py), every request authenticated (node/web_auth.py) and answered
with security headers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from p2pcompute.errors import ControlAPIError, P2PCError
from p2pcompute.node.control import CONTROL_HOST, ENDPOINT_FILENAME, MAX_REQUEST_BODY, write_private
from p2pcompute.node.loop import BackgroundLoop
from p2pcompute.node.web_auth import ControlAuth, Refusal

logger = logging.getLogger(__name__)

HANDLER_THREADS = 8  # blocking handlers at once (DHT lookups, SQLite reads); a few CLI calls and one or two pages
BACKLOG = 64  # pending connections; the API has a handful of local clients
START_TIMEOUT = 10.0  # seconds to start serving on the already bound socket
STOP_TIMEOUT = 3.0  # seconds open requests (a page's event stream, a slow handler) get when the node stops
# Pages may load scripts, styles, images and data from this server only; nothing inline, no frames, no plugins.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")

Handler = Callable[[dict], Any]


class ControlServer:
    """The control API's web server (aiohttp on a private event loop in a thread): JSON handlers under /api/ and the
    pages and streams others mount (node/dashboard.py), every request checked by `auth` (node/web_auth.py) and
    answered with security headers. `start()` serves and writes control.json; `shutdown()` stops and removes it."""

    def __init__(self, data_dir: Path, token: str, port: int = 0, clock: Callable[[], float] = time.time):
        self.data_dir = data_dir
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((CONTROL_HOST, port))
        except OSError as e:
            self._sock.close()
            raise ControlAPIError(f"cannot listen on {CONTROL_HOST}:{port} for the control API: {e}") from None
        self._sock.listen(BACKLOG)
        self._sock.setblocking(False)
        self.auth = ControlAuth(token, self.port, clock)
        self._public: set[str] = set()
        self._loop = BackgroundLoop("control-api")
        self._executor = ThreadPoolExecutor(HANDLER_THREADS, thread_name_prefix="control-handler")
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._guard], client_max_size=MAX_REQUEST_BODY)
        self.app.on_response_prepare.append(_security_headers)

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop.loop

    def route(self, method: str, name: str, handler: Handler) -> None:
        """`handler(args)` answers `method /api/<name>`: args is the JSON body of a POST, the query of a GET; its
        result comes back as {"result": ...}; a P2PCError as {"error", "exit_code"} with HTTP 400."""

        async def serve(request: web.Request) -> web.Response:
            return await self._call(request, name, handler)

        self.app.router.add_route(method, f"/api/{name}", serve)

    def add_route(self, method: str, path: str, handler, *, public: bool = False) -> None:
        """An aiohttp handler for `path` (pages, streams, downloads); `public`: no credential needed (the login
        page, which checks its one-time code itself). Host and Origin are checked either way."""
        if public:
            self._public.add(path)
        self.app.router.add_route(method, path, handler)

    async def run_blocking(self, fn: Callable, *args) -> Any:
        """Run a blocking call (DHT, SQLite) in the handler threads, off the event loop."""
        return await self.loop.run_in_executor(self._executor, fn, *args)

    def start(self) -> None:
        self.app.router.add_route("*", "/api/{tail:.*}", _no_such_endpoint)  # last: after every real route
        self._loop.start()
        self._loop.run(self._serve(), timeout=START_TIMEOUT)
        endpoint = {"host": CONTROL_HOST, "port": self.port, "pid": os.getpid()}
        write_private(self.data_dir / ENDPOINT_FILENAME, json.dumps(endpoint).encode())

    async def _serve(self) -> None:
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None, shutdown_timeout=STOP_TIMEOUT)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    def shutdown(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / ENDPOINT_FILENAME).unlink()
        if self._runner is not None:
            try:
                self._loop.run(self._runner.cleanup(), timeout=STOP_TIMEOUT + 5)
            except TimeoutError:
                logger.warning("the control API did not stop within %.0f s", STOP_TIMEOUT + 5)
            self._runner = None
        self._loop.shutdown()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._sock.close()

    # ---- every request -------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path in self._public:
            verdict = self.auth.check_site(request.headers)
        else:
            verdict = self.auth.check(request.method, request.headers, request.cookies)
        if isinstance(verdict, Refusal):
            logger.info("control API: refused %s %s: %s", request.method, request.path, verdict.reason)
            return refusal_response(request, verdict.status, verdict.reason)
        request["caller"] = verdict
        return await handler(request)

    async def _call(self, request: web.Request, name: str, handler: Handler) -> web.Response:
        if request.method == "POST":
            if (request.content_length or 0) > MAX_REQUEST_BODY:
                return _json(413, {"error": f"request body over {MAX_REQUEST_BODY} bytes"})
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _json(413, {"error": f"request body over {MAX_REQUEST_BODY} bytes"})
            try:
                args = json.loads(body or b"{}")
            except (ValueError, UnicodeDecodeError):
                return _json(400, {"error": "request body is not JSON"})
            if not isinstance(args, dict):
                return _json(400, {"error": "request body must be a JSON object"})
        else:
            args = dict(request.query)
        try:
            result = await self.run_blocking(handler, args)
        except P2PCError as e:
            return _json(400, {"error": str(e), "exit_code": e.exit_code})
        except Exception as e:  # a bug in a handler must not kill the server; report it to the caller
            logger.exception("control API handler %s failed", name)
            return _json(500, {"error": f"internal error: {type(e).__name__}: {e}"})
        return _json(200, {"result": result})


def _json(status: int, payload: dict) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload, default=str).encode(), content_type="application/json")


def refusal_response(request: web.Request, status: int, reason: str) -> web.Response:
    """A refusal as JSON for the API, as one line of text for a page."""
    if request.path.startswith("/api/"):
        return _json(status, {"error": reason})
    return web.Response(status=status, text=f"{reason}\n", content_type="text/plain")


async def _no_such_endpoint(request: web.Request) -> web.Response:
    return _json(404, {"error": f"no such endpoint {request.method} {request.path}"})


async def _security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    """On every answer, pages or not: no framing, no MIME sniffing, no referrer, scripts and styles from here only."""
    headers = response.headers
    headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    headers["X-Frame-Options"] = "DENY"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Cross-Origin-Resource-Policy"] = "same-origin"
    headers.setdefault("Cache-Control", "no-store")
    headers["Server"] = "p2pc-control"
