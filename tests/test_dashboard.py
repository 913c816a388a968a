"""The node's own page in a real browser (Debian's headless Chromium, driven by Selenium through its chromedriver)
against a real swarm training a run: the page loads without console errors, shows the peers, its loss chart gains
points as epochs pass, pause stops training and resume restarts it; and the control API refuses requests without
the token or a session, and state changes from another origin or without the CSRF token.

Set P2PC_SKIP_BROWSER=1 to skip the browser tests where Chromium is not installed (CI installs it: .ci/run);
screenshots of each view go to $P2PC_SCREENSHOT_DIR (default: a temporary directory, printed)."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import Swarm, p2pc_json, run_p2pc, wait_until
from p2pcompute.node.control import ControlClient
from p2pcompute.runs.specs import mlp_synthetic_spec

CHROMIUM = "/usr/bin/chromium"  # Debian's `chromium` package
CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's `chromium-driver` package (the same version as the browser)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,900")
VIEWS = ("node", "swarm", "runs", "credits", "ledger")
PAGE_TIMEOUT = 90  # seconds for something to show on the page: epochs last ~2 s, a pause waits for a round to end


def dashboard_spec() -> str:
    """Two peers, short epochs (384 samples, groups gather for 1.5 s), no end: epochs pass while the tests look."""
    return mlp_synthetic_spec(
        "dashboard", batch_size_per_step=32, target_batch_size=384, max_epochs=0, in_features=8, hidden=[32],
        out_features=2, activation="relu", noise="0.1", seed=5, averaging={"compression": "none",
                                                                           "matchmaking_time": "1.5"},
        hardware={"min_memory_mb": 64, "devices": ["cpu", "cuda"]}, credits={"rate": 1000, "quorum": 1})


@pytest.fixture(scope="module")
def dash_swarm(tmp_path_factory):
    """A bootstrap and two nodes training one published run, shared by every test here."""
    s = Swarm(tmp_path_factory.mktemp("dashboard"))
    try:
        s.start_bootstrap()
        s.nodes = [s.start_node(f"dash{i}", "--min-peers", "2", wait=False) for i in range(2)]
        for node in s.nodes:  # started together: two cold starts overlap
            node.wait_ready()
        spec = s.root / "run.toml"
        spec.write_text(dashboard_spec())
        # --force: 384-sample epochs are far below what the publish check asks for; these tests want many of them
        s.run_id = p2pc_json("run", "publish", str(spec), "--force", "--data-dir", str(s.nodes[0].data_dir),
                             timeout=120)["run_id"]
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if os.environ.get("P2PC_SKIP_BROWSER") == "1":
        pytest.skip("P2PC_SKIP_BROWSER=1")
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        pytest.fail(f"the page tests need headless Chromium: {', '.join(missing)} missing (apt-get install -y "
                    "chromium chromium-driver, as .ci/run does; or set P2PC_SKIP_BROWSER=1 to skip them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    directory = Path(os.environ.get("P2PC_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {directory}")
    return directory


def login_url(node) -> str:
    """A one-time login link, asked for as `p2pc node dashboard` does (the first test runs the command itself)."""
    return ControlClient(node.data_dir).call("auth/login-code", {})["url"]


def status_of(node) -> dict:
    """GET /api/status, what `p2pc node status --json` prints (polled in-process: a CLI start costs seconds)."""
    return ControlClient(node.data_dir).call("status")


def request(port: int, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """(status, headers, body) of one plain HTTP request to the node's control API."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_requests_without_the_token_or_from_another_origin_are_refused(dash_swarm):
    node = dash_swarm.nodes[1]
    port = json.loads((node.data_dir / "control.json").read_text())["port"]
    token = (node.data_dir / "control.token").read_text().strip()
    bearer = {"Authorization": f"Bearer {token}"}
    for path in ("/", "/static/dashboard.js", "/api/status", "/api/events", "/api/ledger/export"):
        assert request(port, "GET", path)[0] == 401, path
    status, headers, _ = request(port, "GET", "/api/status", {"Authorization": "Bearer wrong"})
    assert status == 401
    # every answer, refusals included, forbids framing, MIME sniffing and anything not from the node itself
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    # the token itself, sent from another site's page, or to another Host name (DNS rebinding)
    assert request(port, "POST", "/api/pause", dict(bearer, Origin="http://evil.example"), b"{}")[0] == 403
    assert request(port, "GET", "/api/status", dict(bearer, Host="evil.example"))[0] == 403

    printed = run_p2pc("node", "dashboard", "--data-dir", str(node.data_dir), check=True).stdout
    code_url = urlsplit(next(line for line in printed.splitlines() if line.startswith("http://127.0.0.1:")))
    status, headers, _ = request(port, "GET", f"{code_url.path}?{code_url.query}")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert request(port, "GET", f"{code_url.path}?{code_url.query}")[0] == 401  # a login code works once
    session = {"Cookie": cookie.split(";")[0]}
    assert request(port, "GET", "/", session)[0] == 200
    status, _, body = request(port, "GET", "/api/session", session)
    csrf = json.loads(body)["result"]["csrf"]
    own_origin = f"http://127.0.0.1:{port}"
    changes = [  # a state change needs the session, this server as Origin and the session's CSRF token
        (dict(session, Origin=own_origin), 403),
        (dict(session, Origin="http://evil.example", **{"X-CSRF-Token": csrf}), 403),
        (dict(session, **{"X-CSRF-Token": csrf}), 403),
        ({"Origin": own_origin, "X-CSRF-Token": csrf}, 401),
    ]
    for headers, expected in changes:
        assert request(port, "POST", "/api/pause", headers, b"{}")[0] == expected, headers
    assert status_of(node)["paused"] is False  # none of them got through
    ok, _, body = request(port, "POST", "/api/resume", dict(session, Origin=own_origin, **{"X-CSRF-Token": csrf}),
                          b"{}")
    assert ok == 200 and json.loads(body)["result"]["paused"] is False


def trainer_of(node) -> dict | None:
    training = status_of(node).get("training") or {}
    return training.get("trainer")


def test_the_page_shows_the_swarm_and_the_loss_chart_grows(dash_swarm, browser, screenshots):
    from selenium.webdriver.common.by import By

    node = dash_swarm.nodes[0]
    browser.get(login_url(node))
    assert urlsplit(browser.current_url).path == "/"
    live = lambda: browser.find_element(By.ID, "conn").text == "live"  # noqa: E731
    wait_until(live, timeout=PAGE_TIMEOUT, what="the page's live updates")
    base = browser.current_url.split("#")[0]

    browser.get(base + "#swarm")
    wait_until(live, timeout=PAGE_TIMEOUT, what="the live updates after a reload")
    peers_table = lambda: browser.find_element(By.ID, "peers").text  # noqa: E731
    wait_until(lambda: all(n.peer_id in peers_table() for n in dash_swarm.nodes), timeout=PAGE_TIMEOUT,
               what="both nodes in the page's peer table")

    browser.get(base + "#runs")
    points = lambda: int(browser.find_element(By.ID, "loss-chart").get_attribute("data-points") or 0)  # noqa: E731
    wait_until(lambda: points() >= 2 and (trainer_of(node) or {}).get("status") == "training",
               timeout=PAGE_TIMEOUT, what="the loss chart's first points")
    before, epoch = points(), trainer_of(node)["epoch"]
    wait_until(lambda: trainer_of(node)["epoch"] >= epoch + 2 and points() > before, timeout=PAGE_TIMEOUT,
               what="two more epochs and new points on the chart")
    assert dash_swarm.run_id in browser.find_element(By.ID, "run-fields").text

    for view in VIEWS:
        browser.get(base + "#" + view)
        wait_until(live, timeout=PAGE_TIMEOUT, what=f"the {view} view")
        if view == "ledger":  # the explorer opens on this node's own chain: its run.publish entry, signature ok
            wait_until(lambda: "run.publish" in browser.find_element(By.ID, "entries").text, timeout=PAGE_TIMEOUT,
                       what="this node's entries in the ledger explorer")
            assert "ok" in browser.find_element(By.ID, "entries").text
        if view == "credits":
            wait_until(lambda: node.peer_id in browser.find_element(By.ID, "credit-fields").text,
                       timeout=PAGE_TIMEOUT, what="the credits view")
        browser.save_screenshot(str(screenshots / f"dashboard-{view}.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # CSP violations, failed requests and script errors all land here


def test_pause_stops_training_and_resume_restarts_it(dash_swarm, browser):
    from selenium.webdriver.common.by import By

    node = dash_swarm.nodes[0]
    browser.get(login_url(node))
    wait_until(lambda: browser.find_element(By.ID, "conn").text == "live", timeout=PAGE_TIMEOUT, what="the page")
    wait_until(lambda: browser.find_element(By.ID, "pause").is_enabled(), timeout=PAGE_TIMEOUT, what="Pause enabled")
    browser.find_element(By.ID, "pause").click()

    def paused():
        status = status_of(node)
        trainer = (status.get("training") or {}).get("trainer") or {}
        return status["paused"] and status["status"] == "paused" and trainer.get("status") == "paused" and trainer

    held = wait_until(paused, timeout=PAGE_TIMEOUT, what="the node to say it is paused")
    cli = p2pc_json("node", "status", "--data-dir", str(node.data_dir))
    assert cli["paused"] and cli["status"] == "paused" and cli["training"]["trainer"]["status"] == "paused"
    wait_until(lambda: "paused by the owner" in browser.find_element(By.ID, "node-fields").text,
               timeout=PAGE_TIMEOUT, what="the page to show the pause")
    assert trainer_of(node)["samples_done"] == held["samples_done"]  # no step since (and `status` took a while)
    browser.find_element(By.ID, "resume").click()
    wait_until(lambda: (t := trainer_of(node))["status"] == "training" and t["samples_done"] > held["samples_done"],
               timeout=PAGE_TIMEOUT, what="training to go on after resume")
    assert status_of(node)["paused"] is False
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    other = str(dash_swarm.nodes[1].data_dir)  # the same through the CLI, on the other node
    assert p2pc_json("node", "pause", "--data-dir", other)["paused"] is True
    assert "resumed" in run_p2pc("node", "resume", "--data-dir", other, check=True).stdout
    assert status_of(dash_swarm.nodes[1])["paused"] is False


def test_eta_follows_the_pace_of_the_last_epochs():
    from p2pcompute.node.history import EpochPoint, eta_seconds

    def at(epoch: int, t: float) -> EpochPoint:
        return EpochPoint(epoch, t, 1.0, 1.0, 10.0, 20.0, 2, 32, 0.5)

    assert eta_seconds([at(0, 0.0)], 10) is None  # no pace yet
    assert eta_seconds([at(0, 0.0), at(2, 10.0)], 0) is None  # the run has no end
    assert eta_seconds([at(0, 0.0), at(2, 10.0)], 10) == 40.0  # 5 s per epoch, 8 to go
    slow_start = [at(0, 0.0), at(1, 100.0)] + [at(e, 100.0 + 2 * (e - 1)) for e in range(2, 14)]
    assert eta_seconds(slow_start, 20) == 14.0  # the last 10 epochs' pace (2 s each), not the slow first one
    assert eta_seconds([at(0, 0.0), at(10, 10.0)], 10) is None  # done
