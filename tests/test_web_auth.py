"""Who may use the control API (node/web_auth.py), decided from headers, cookies and the clock alone."""

from __future__ import annotations

from p2pcompute.node.web_auth import LOGIN_CODE_TTL, MAX_LOGIN_CODES, SESSION_TTL, Caller, ControlAuth, Refusal

PORT = 40123
HOST = {"Host": f"127.0.0.1:{PORT}"}
ORIGIN = f"http://127.0.0.1:{PORT}"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[ControlAuth, Clock]:
    clock = Clock()
    return ControlAuth("t" * 43, PORT, clock), clock


def test_bearer_token_and_the_site_rule():
    auth, _ = make()
    assert auth.check("POST", dict(HOST, Authorization="Bearer " + "t" * 43), {}) == Caller("token")
    assert auth.check("GET", dict(HOST, Authorization="Bearer wrong"), {}).status == 401
    assert auth.check("GET", dict(HOST, Authorization="t" * 43), {}).status == 401  # not a Bearer header
    assert auth.check("GET", HOST, {}).status == 401
    # the right token from another site's page, or to another host name (DNS rebinding): refused all the same
    good = {"Authorization": "Bearer " + "t" * 43}
    assert auth.check("GET", dict(good, Host="evil.example"), {}).status == 403
    assert auth.check("GET", dict(good, Host=f"127.0.0.1:{PORT + 1}"), {}).status == 403
    assert auth.check("GET", dict(HOST, Origin="http://evil.example", **good), {}).status == 403
    assert auth.check("GET", dict(HOST, Origin=f"http://localhost:{PORT}", **good), {}) == Caller("token")


def test_a_login_code_works_once_and_not_after_it_expired():
    auth, clock = make()
    code = auth.new_login_code()
    session, csrf = auth.login(code)
    assert auth.login(code) is None
    assert auth.check("GET", HOST, {auth.cookie_name: session}) == Caller("session", csrf)
    late = auth.new_login_code()
    clock.now += LOGIN_CODE_TTL + 1
    assert auth.login(late) is None
    assert auth.login("made-up") is None
    codes = [auth.new_login_code() for _ in range(MAX_LOGIN_CODES + 1)]
    assert auth.login(codes[0]) is None and auth.login(codes[-1]) is not None  # the oldest unused code went first


def test_a_session_changes_state_only_with_its_csrf_token_and_this_origin():
    auth, clock = make()
    session, csrf = auth.login(auth.new_login_code())
    cookies = {auth.cookie_name: session}
    good = dict(HOST, Origin=ORIGIN, **{"X-CSRF-Token": csrf})
    assert auth.check("POST", good, cookies) == Caller("session", csrf)
    refused = [
        dict(HOST, Origin=ORIGIN),  # no CSRF token
        dict(HOST, Origin=ORIGIN, **{"X-CSRF-Token": "x" * 43}),  # another one
        dict(HOST, **{"X-CSRF-Token": csrf}),  # no Origin
        dict(HOST, Origin="http://evil.example", **{"X-CSRF-Token": csrf}),
    ]
    for headers in refused:
        verdict = auth.check("POST", headers, cookies)
        assert isinstance(verdict, Refusal) and verdict.status == 403, headers
    assert auth.check("POST", good, {"p2pc_session_1": session}).status == 401  # another node's cookie name
    assert auth.check("GET", HOST, {auth.cookie_name: "forged"}).status == 401
    clock.now += SESSION_TTL + 1
    assert auth.check("GET", HOST, cookies).status == 401
