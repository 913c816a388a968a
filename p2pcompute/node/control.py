"""The node's control API: HTTP+JSON on 127.0.0.1 only, every request carrying the token kept in the data dir."""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import logging
import os
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from p2pcompute.errors import ControlAPIError, NodeNotRunning, P2PCError

logger = logging.getLogger(__name__)

TOKEN_FILENAME = "control.token"
ENDPOINT_FILENAME = "control.json"
CONTROL_HOST = "127.0.0.1"  # never anything else: the API controls the node
MAX_REQUEST_BODY = 64 * 1024  # control requests are small JSON objects
CLIENT_TIMEOUT = 15.0  # seconds; the slowest call (peers) does one bounded DHT traversal

Handler = Callable[[dict], Any]


def write_private(path: Path, data: bytes) -> None:
    """Atomically write a file only its owner can read (mode 0600 from the first byte)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_token(data_dir: Path) -> str:
    path = data_dir / TOKEN_FILENAME
    if path.exists():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        token = path.read_text().strip()
        if len(token) >= 32:
            return token
    token = secrets.token_urlsafe(32)
    write_private(path, token.encode())
    return token


class ControlServer:
    """Routes GET/POST /api/<name> to handlers; `start()` serves in a thread, `shutdown()` stops it."""

    def __init__(self, data_dir: Path, token: str, port: int = 0):
        self.data_dir = data_dir
        self._token = token
        self._routes: dict[tuple[str, str], Handler] = {}
        self._pages: dict[str, Callable[[], str]] = {}
        server = self

        class _RequestHandler(BaseHTTPRequestHandler):
            server_version = "p2pc-control"

            def log_message(self, fmt: str, *args) -> None:
                logger.debug("control API: " + fmt, *args)

            def do_GET(self) -> None:
                server._dispatch(self, "GET")

            def do_POST(self) -> None:
                server._dispatch(self, "POST")

        self._httpd = ThreadingHTTPServer((CONTROL_HOST, port), _RequestHandler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def route(self, method: str, name: str, handler: Handler) -> None:
        self._routes[(method, name)] = handler

    def page(self, path: str, render: Callable[[], str]) -> None:
        self._pages[path] = render

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="control-api", daemon=True)
        self._thread.start()
        endpoint = {"host": CONTROL_HOST, "port": self.port, "pid": os.getpid()}
        write_private(self.data_dir / ENDPOINT_FILENAME, json.dumps(endpoint).encode())

    def shutdown(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / ENDPOINT_FILENAME).unlink()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _authorized(self, request: BaseHTTPRequestHandler, query: dict) -> bool:
        header = request.headers.get("Authorization", "")
        supplied = header[len("Bearer "):] if header.startswith("Bearer ") else query.get("token", [""])[0]
        return hmac.compare_digest(supplied.encode(), self._token.encode())

    def _dispatch(self, request: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        if not self._authorized(request, query):
            return self._reply(request, 401, {"error": "missing or wrong control token"})
        if method == "GET" and url.path in self._pages:
            body = self._pages[url.path]().encode()
            request.send_response(200)
            request.send_header("Content-Type", "text/html; charset=utf-8")
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)
            return None
        if not url.path.startswith("/api/"):
            return self._reply(request, 404, {"error": f"no such endpoint {url.path}"})
        handler = self._routes.get((method, url.path[len("/api/"):]))
        if handler is None:
            return self._reply(request, 404, {"error": f"no such endpoint {method} {url.path}"})
        args: dict = {}
        if method == "POST":
            try:
                length = int(request.headers.get("Content-Length", "0"))
            except ValueError:
                return self._reply(request, 400, {"error": "bad Content-Length"})
            if not 0 <= length <= MAX_REQUEST_BODY:
                return self._reply(request, 413, {"error": f"request body over {MAX_REQUEST_BODY} bytes"})
            try:
                args = json.loads(request.rfile.read(length) or b"{}")
            except (ValueError, UnicodeDecodeError):
                return self._reply(request, 400, {"error": "request body is not JSON"})
            if not isinstance(args, dict):
                return self._reply(request, 400, {"error": "request body must be a JSON object"})
        try:
            result = handler(args)
        except P2PCError as e:
            return self._reply(request, 400, {"error": str(e), "exit_code": e.exit_code})
        except Exception as e:  # a bug in a handler must not kill the API thread; report it to the caller
            logger.exception("control API handler %s failed", url.path)
            return self._reply(request, 500, {"error": f"internal error: {type(e).__name__}: {e}"})
        return self._reply(request, 200, {"result": result})

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        body = json.dumps(payload, default=str).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


class ControlClient:
    """Talks to the node whose data dir is given; raises NodeNotRunning when there is none."""

    def __init__(self, data_dir: Path, timeout: float = CLIENT_TIMEOUT):
        self.data_dir = data_dir
        self.timeout = timeout
        try:
            endpoint = json.loads((data_dir / ENDPOINT_FILENAME).read_text())
            self.port = int(endpoint["port"])
            self.token = (data_dir / TOKEN_FILENAME).read_text().strip()
        except FileNotFoundError:
            raise NodeNotRunning(f"no node is running with data dir {data_dir} (start one: p2pc node start)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NodeNotRunning(f"cannot read the control endpoint in {data_dir}: {e}") from None

    def call(self, name: str, args: dict | None = None, method: str | None = None) -> Any:
        method = method or ("POST" if args is not None else "GET")
        conn = http.client.HTTPConnection(CONTROL_HOST, self.port, timeout=self.timeout)
        body = json.dumps(args).encode() if args is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        try:
            conn.request(method, f"/api/{name}", body=body, headers=headers)
            response = conn.getresponse()
            payload = json.loads(response.read() or b"{}")
        except (ConnectionRefusedError, ConnectionResetError):
            raise NodeNotRunning(
                f"the node with data dir {self.data_dir} is not answering (stale control.json?); start it again"
            ) from None
        except TimeoutError:
            raise ControlAPIError(f"the node did not answer {name} within {self.timeout:.0f} s") from None
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise ControlAPIError(f"control API call {name} failed: {e}") from None
        finally:
            conn.close()
        if response.status != 200:
            error = ControlAPIError(payload.get("error", f"HTTP {response.status}"))
            if isinstance(payload.get("exit_code"), int):
                error.exit_code = payload["exit_code"]
            raise error
        return payload.get("result")
