"""Reaching the node's control API: its endpoint and token files in the data dir, and the client the CLI uses
(the server is node/control_server.py; the CLI does not load it)."""

from __future__ import annotations

import http.client
import json
import os
import secrets
from pathlib import Path
from typing import Any

from p2pcompute.errors import ControlAPIError, NodeNotRunning

TOKEN_FILENAME = "control.token"
ENDPOINT_FILENAME = "control.json"
CONTROL_HOST = "127.0.0.1"  # never anything else: the API controls the node
MAX_REQUEST_BODY = 64 * 1024  # control requests are small JSON objects
CLIENT_TIMEOUT = 15.0  # seconds; the slowest call (peers) does one bounded DHT traversal


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
