"""Who may use the control API: the bearer token, one-time login codes, browser sessions (cookie + CSRF token), and
the Host/Origin rule against other web sites and DNS rebinding. Pure logic: the clock is passed in."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import secrets
import threading
from typing import Callable, Mapping

LOGIN_CODE_TTL = 120.0  # seconds a code from `p2pc node dashboard` stays usable: enough to open a browser
MAX_LOGIN_CODES = 16  # codes not used yet; a 17th request drops the oldest (a runaway script cannot grow the table)
SESSION_TTL = 12 * 3600.0  # seconds a browser session lasts: a working day; then `p2pc node dashboard` again
MAX_SESSIONS = 32  # browser sessions at once; the oldest is dropped first
SESSION_COOKIE = "p2pc_session"  # the port is appended: cookies are per host, not per port (see cookie_name)
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD")


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who a request comes from: "token" (the bearer token: the CLI, scripts) or "session" (a logged-in page)."""

    kind: str
    csrf: str = ""  # the session's CSRF token (sessions only)


@dataclasses.dataclass(frozen=True)
class Refusal:
    status: int  # 401: not authenticated; 403: authenticated but not allowed from there / without CSRF
    reason: str


def _key(secret: str) -> bytes:
    """Tables are keyed by a hash of each secret, so a lookup's timing tells nothing about the secret itself."""
    return hashlib.sha256(secret.encode()).digest()


class ControlAuth:
    """The rules for one control API on 127.0.0.1:`port`. Thread-safe.

    - The bearer token (`Authorization: Bearer <token>`) is the CLI's credential; compared in constant time.
    - `new_login_code()` (asked for with the token) gives a code that `login(code)` exchanges, once, for a session.
    - A session is an HttpOnly SameSite=Strict cookie; requests that change state must also carry the session's
      CSRF token in `X-CSRF-Token` and an Origin of this very server.
    - Whatever the credential, a Host other than this server's (DNS rebinding) or an Origin of another site is
      refused."""

    def __init__(self, token: str, port: int, clock: Callable[[], float]):
        self._token = token.encode()
        self.port = port
        self.clock = clock
        self._lock = threading.Lock()
        self._codes: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # key -> expiry
        self._sessions: collections.OrderedDict[bytes, tuple[float, str]] = collections.OrderedDict()

    @property
    def cookie_name(self) -> str:
        return f"{SESSION_COOKIE}_{self.port}"

    @property
    def origins(self) -> tuple[str, ...]:
        return f"http://127.0.0.1:{self.port}", f"http://localhost:{self.port}"

    # ---- login codes and sessions ------------------------------------------------------------------

    def new_login_code(self) -> str:
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._codes[_key(code)] = self.clock() + LOGIN_CODE_TTL
            while len(self._codes) > MAX_LOGIN_CODES:
                self._codes.popitem(last=False)
        return code

    def login(self, code: str) -> tuple[str, str] | None:
        """Exchange a login code for a new session: (session id, CSRF token); None if the code is unknown, used
        or expired."""
        now = self.clock()
        with self._lock:
            expiry = self._codes.pop(_key(code), None)
            if expiry is None or expiry < now:
                return None
            session, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
            self._sessions[_key(session)] = (now + SESSION_TTL, csrf)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session, csrf

    def logout(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(_key(session), None)

    def _session(self, session: str) -> str | None:
        """The session's CSRF token, or None when there is no such live session."""
        with self._lock:
            found = self._sessions.get(_key(session))
            if found is None:
                return None
            if found[0] < self.clock():
                del self._sessions[_key(session)]
                return None
            return found[1]

    # ---- one request -------------------------------------------------------------------------------

    def check_site(self, headers: Mapping[str, str]) -> Refusal | None:
        """The rule every request meets, with or without a credential: addressed to this server (Host), and not
        sent by another site's page (Origin, when the browser names one)."""
        host = headers.get("Host", "")
        if host not in (f"127.0.0.1:{self.port}", f"localhost:{self.port}"):
            return Refusal(403, f"Host {host!r} is not this control API (127.0.0.1:{self.port})")
        origin = headers.get("Origin")
        if origin is not None and origin not in self.origins:
            return Refusal(403, f"requests from {origin!r} are not allowed")
        return None

    def check(self, method: str, headers: Mapping[str, str], cookies: Mapping[str, str]) -> Caller | Refusal:
        """Decide on one request from its method, headers and cookies (case-insensitive header mapping)."""
        refused = self.check_site(headers)
        if refused is not None:
            return refused
        origin = headers.get("Origin")
        authorization = headers.get("Authorization", "")
        if authorization:
            supplied = authorization[len("Bearer "):] if authorization.startswith("Bearer ") else ""
            if hmac.compare_digest(supplied.encode(), self._token):
                return Caller("token")
            return Refusal(401, "missing or wrong control token")
        session = cookies.get(self.cookie_name)
        csrf = self._session(session) if session else None
        if csrf is None:
            return Refusal(401, "missing or wrong control token (open the page with `p2pc node dashboard`)")
        if method not in SAFE_METHODS:
            if origin is None:
                return Refusal(403, "a request that changes state must say its Origin")
            if not hmac.compare_digest(headers.get(CSRF_HEADER, "").encode(), csrf.encode()):
                return Refusal(403, f"missing or wrong {CSRF_HEADER}")
        return Caller("session", csrf)
