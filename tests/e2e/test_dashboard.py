"""The dashboard in headless Chromium, driven by Selenium, checked as a user reads it:
deployments and replica counts; each replica's pid and in-flight count; charts on one
time axis with a range selector, with gaps where there was no traffic; an error rate
shown only over enough requests; a killed replica in the cluster events; deployment
lifecycle events that are still there after the head restarts. Screenshots are saved
in the test's tmp dir (and the first also to test-artifacts/dashboard.png)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.responses import JSONResponse

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import READY, STARTING, ReplicaReport
from shoal.core.placement import Capacity
from shoal.core.spec import parse_spec
from shoal.head.node import HeadNode
from shoal.http.head import head_app
from shoal.http.server import HttpServer
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration
from tests.e2e.conftest import Up, shoal, stop_group, wait_ready

pytestmark = pytest.mark.timeout(120)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them when run as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1800",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver: object, script: str, timeout_s: float = 30) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = driver.execute_script(script)  # type: ignore[attr-defined]
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s}s: {script}")
        time.sleep(0.2)


def infer(http: httpx.Client, name: str, ok: int, bad: int = 0) -> None:
    """``ok`` requests the model answers, and ``bad`` ones it refuses (a wrong shape)."""
    url = f"/v2/models/{name}/infer"
    for width, count, status in ((16, ok, 200), (15, bad, 400)):
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, width], "data": [1.0] * width}]}
        for _ in range(count):
            assert http.post(url, json=body).status_code == status


def chart_data(browser: object, name: str, column: int) -> list[float | None]:
    """What deployment ``name``'s latency chart was given to draw: column 0 is time, 1 is p50."""
    return browser.execute_script(  # type: ignore[attr-defined,no-any-return]
        f"return window.shoal.charts[{json.dumps(name)}].latency.data[{column}]"
    )


def test_dashboard_shows_deployments_traffic_and_events(
    up: Up, browser: object, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    status = wait_ready(up, "echo", 1)
    wait_ready(up, "digits", 2)
    browser.get(f"http://{up.endpoints['head_http']}/")  # type: ignore[attr-defined]
    # The page lists each deployment with its replica count.
    wait_until(
        browser,
        "return document.querySelector('tr[data-deployment=\"digits\"] .count')?.textContent === '2 / 2'",
    )
    wait_until(
        browser,
        "return document.querySelector('tr[data-deployment=\"echo\"] .count')?.textContent === '1 / 1'",
    )
    # Each replica's row has its pid and its requests in flight.
    echo = next(d for d in status["deployments"] if d["name"] == "echo")
    replica = echo["replicas"][0]
    row = f"#replicas tr[data-replica={json.dumps(replica['id'])}]"
    assert wait_until(browser, f"return document.querySelector('{row} .pid')?.textContent") == str(
        replica["pid"]
    )
    assert wait_until(browser, f"return document.querySelector('{row} .in-flight')?.textContent") == "0"
    # The link to the API docs.
    docs = browser.execute_script("return document.getElementById('api-docs').getAttribute('href')")  # type: ignore[attr-defined]
    assert docs == "/docs"

    http = httpx.Client(base_url=f"http://{up.endpoints['scheduler_http']}", timeout=10)
    request.addfinalizer(http.close)
    error_rate = "document.querySelector('tr[data-deployment=\"echo\"] .error-rate')"
    # One failure in two requests is too few to call an error rate: a dash, not "50%".
    infer(http, "echo", ok=1, bad=1)
    wait_until(browser, f"return {error_rate}?.dataset.requests === '2'")
    assert browser.execute_script(f"return {error_rate}.textContent") == "\N{EN DASH}"  # type: ignore[attr-defined]
    # Traffic makes points in the deployment's charts.
    wait_until(
        browser,
        "return Number(document.querySelector('.chart[data-deployment=\"echo\"]')?.dataset.points) > 0",
    )
    # Over the minimum count, the rate shows: 3 errors in 34 requests.
    infer(http, "echo", ok=30, bad=2)
    wait_until(browser, f"return {error_rate}?.dataset.requests === '34'")
    assert browser.execute_script(f"return {error_rate}.textContent") == "8.8%"  # type: ignore[attr-defined]

    # No traffic for a while, then traffic again: the latency chart gets one more line,
    # with a gap (null points) before it, not a line through 0 ms; requests/s is 0 there.
    chart = "document.querySelector('.chart[data-deployment=\"echo\"]')"
    wait_until(browser, "const p = window.shoal.charts.echo.latency.data[1]; return p[p.length - 1] === null")
    before = int(browser.execute_script(f"return {chart}.dataset.segments"))  # type: ignore[attr-defined]
    assert before >= 1
    infer(http, "echo", ok=5)
    wait_until(browser, f"return {chart}.dataset.segments === '{before + 1}'")
    p50 = chart_data(browser, "echo", 1)
    last = max(i for i, v in enumerate(p50) if i > 0 and v is not None and p50[i - 1] is None)
    assert any(v is not None for v in p50[:last]), p50
    assert all(v is None or v > 0 for v in p50), p50
    rate = browser.execute_script("return window.shoal.charts.echo.rate.data[1]")  # type: ignore[attr-defined]
    assert rate[last - 1] == 0, (rate, p50)
    # The rate chart has the same points in time: one axis for all.
    assert browser.execute_script(  # type: ignore[attr-defined]
        "const c = window.shoal.charts.echo;"
        "return JSON.stringify(c.rate.data[0]) === JSON.stringify(c.latency.data[0])"
    )

    # The range selector: 5 minutes by default, then 15; every chart's axis follows.
    def span() -> float:
        return float(
            browser.execute_script(  # type: ignore[attr-defined]
                f"const d = {chart}.dataset; return Number(d.xMax) - Number(d.xMin)"
            )
        )

    assert abs(span() - 300) < 1
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "range")).select_by_visible_text("15 min")  # type: ignore[attr-defined]
    wait_until(
        browser, f"const d = {chart}.dataset; return Math.abs(Number(d.xMax) - Number(d.xMin) - 900) < 1"
    )
    assert browser.execute_script(  # type: ignore[attr-defined]
        "return Object.values(window.shoal.charts).flatMap(c => [c.rate, c.latency, c.errors])"
        ".every(u => Math.abs(u.scales.x.max - u.scales.x.min - 900) < 1)"
    )
    # A traffic route: a row per target, with its share and the target deployment's own rates.
    shoal("route", "canary", "echo=90", "digits=10", head=up.head)
    row = 'document.querySelector(\'tr[data-route="canary"][data-target="digits"] .share\')'
    assert wait_until(browser, f"return {row}?.textContent") == "10%"
    assert browser.save_screenshot(str(tmp_path / "dashboard.png"))  # type: ignore[attr-defined]

    # A killed replica shows up in the events.
    os.kill(replica["pid"], signal.SIGKILL)
    text = wait_until(
        browser,
        "const e = document.querySelector('#events li[data-kind=\"replica_died\"]');"
        "return e && e.textContent",
    )
    assert replica["id"] in str(text)
    wait_until(
        browser,
        "return document.querySelector('tr[data-deployment=\"echo\"] .count')?.textContent === '1 / 1'",
    )
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))  # type: ignore[attr-defined]
    # And the page never threw.
    logged = browser.get_log("browser")  # type: ignore[attr-defined]
    assert not [e for e in logged if e["level"] == "SEVERE"], logged


def restart_up(up: Up, log: Path) -> subprocess.Popen[str]:
    """Stop ``up``'s ``shoal up`` and start it again over the same state folder."""
    up.remember_children()
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(30) == 0, up.log.read_text()
    (up.state / "endpoints.json").unlink()
    ports = ["--head-port", "0", "--dashboard-port", "0", "--grpc-port", "0", "--http-port", "0"]
    env = {**os.environ, "SHOAL_HEARTBEAT_INTERVAL_S": "0.2", "SHOAL_SHUTDOWN_GRACE_S": "3"}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "up", "--state", str(up.state), *ports],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )


def test_deployment_events_show_on_the_axis_and_survive_a_head_restart(
    up: Up, browser: object, tmp_path: Path, examples_dir: Path
) -> None:
    wait_ready(up, "echo", 1)
    shutil.copy(examples_dir / "echo.py", tmp_path / "echo.py")
    spec = tmp_path / "echo2.yaml"
    spec.write_text((examples_dir / "echo.yaml").read_text().replace("name: echo", "name: echo2"))
    shoal("deploy", str(spec), head=up.head)
    with httpx.Client(base_url=f"http://{up.endpoints['scheduler_http']}", timeout=10) as http:
        infer(http, "echo2", ok=3)
    browser.get(f"http://{up.endpoints['head_http']}/")  # type: ignore[attr-defined]
    created = '#lifecycle li[data-deployment="echo2"][data-kind="created"]'
    deleted = '#lifecycle li[data-deployment="echo2"][data-kind="deleted"]'
    wait_until(browser, f"return document.querySelector('{created}')")
    # Its creation is a mark on its charts' time axis.
    wait_until(
        browser, "return document.querySelector('.chart[data-deployment=\"echo2\"]')?.dataset.markers === '1'"
    )
    shoal("delete", "echo2", head=up.head)
    wait_until(browser, f"return document.querySelector('{deleted}')")
    # Newest first.
    first = browser.execute_script("return document.querySelector('#lifecycle li').dataset")  # type: ignore[attr-defined]
    assert (first["deployment"], first["kind"]) == ("echo2", "deleted")
    assert browser.execute_script(f"return document.querySelector('{deleted}').textContent").count("echo2")  # type: ignore[attr-defined]

    # The head restarts: the events are still there.
    again = restart_up(up, tmp_path / "again.log")
    try:
        deadline = time.monotonic() + 60
        while (
            not (up.state / "endpoints.json").exists()
            or "shoal is up" not in (tmp_path / "again.log").read_text()
        ):
            assert again.poll() is None and time.monotonic() < deadline, (tmp_path / "again.log").read_text()
            time.sleep(0.1)
        head_http = json.loads((up.state / "endpoints.json").read_text())["head_http"]
        browser.get(f"http://{head_http}/")  # type: ignore[attr-defined]
        wait_until(
            browser, f"return document.querySelector('{created}') && document.querySelector('{deleted}')"
        )
        assert browser.save_screenshot(str(tmp_path / "dashboard-after-restart.png"))  # type: ignore[attr-defined]
    finally:
        stop_group(again)


class Gate:
    """The head's app behind a gate that watches ``/api/status``: when each request came and
    was answered, and how many were in the head at once; it holds each ``delay_s`` first, and
    answers 503 while ``failing``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.delay_s = 0.0
        self.failing = False
        self.inside = 0
        self.most_inside = 0
        self.asked: list[tuple[float, float]] = []  # (came, answered), monotonic seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/api/status":
            await self.app(scope, receive, send)
            return
        came = time.monotonic()
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            await asyncio.sleep(self.delay_s)
            if self.failing:
                await JSONResponse({"error": "busy"}, status_code=503)(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            self.inside -= 1
            self.asked.append((came, time.monotonic()))


@contextlib.contextmanager
def head_of_many(
    deployments: Iterable[tuple[str, int, int]], *, tables_late: bool = False
) -> Iterator[tuple[str, Gate]]:
    """A head in memory, its HTTP port served in a thread behind a :class:`Gate`, whose
    scheduler ``s1`` runs ``(name, replicas, of them STARTING)`` of each deployment; with
    ``tables_late``, the head counts ``s1`` among those late taking its routing tables."""
    ready: queue.Queue[tuple[str, Gate, asyncio.AbstractEventLoop, asyncio.Event] | BaseException] = (
        queue.Queue()
    )

    async def serve() -> None:
        node = HeadNode(Settings(), MemoryStore(), FakeSchedulers(), FakeClock())
        reports = []
        for name, count, starting in deployments:
            spec = parse_spec({"name": name, "backend": "python", "model": "m:M", "replicas": count})
            node.desired[name] = spec
            for i in range(count):
                state = STARTING if i < starting else READY
                reports.append(ReplicaReport(f"{name}-{i:02d}", name, state, spec_hash=spec.process_hash()))
        reg = SchedulerRegistration("s1", "s1:1", "s1:2", Capacity(10**4, 10**9, 0), 1, "h", tuple(reports))
        await node.register_scheduler(reg)
        if tables_late:  # what the head finds when s1 has not said it routes by a table 2 s on
            node.routes_lagging = lambda: {"s1"}  # type: ignore[method-assign]
        gate = Gate(head_app(node))
        server = HttpServer(gate, "127.0.0.1", 0)
        await server.start()
        stop = asyncio.Event()
        ready.put((f"127.0.0.1:{server.port}", gate, asyncio.get_running_loop(), stop))
        await stop.wait()
        await server.stop()
        await node.aclose()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as err:
            ready.put(err)

    thread = threading.Thread(target=run, name="head", daemon=True)
    thread.start()
    got = ready.get(timeout=30)
    if isinstance(got, BaseException):
        raise got
    address, gate, loop, stop = got
    try:
        yield address, gate
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


def texts(browser: object, selector: str) -> list[str]:
    return browser.execute_script(  # type: ignore[attr-defined,no-any-return]
        f"return [...document.querySelectorAll({json.dumps(selector)})].map(e => e.textContent)"
    )


def test_the_dashboard_of_a_large_cluster_draws_bounded_tables(browser: object) -> None:
    """250 deployments (one of 12 replicas; one, late by name, with a replica STARTING): at
    most 200 rows per table, with rows saying what was left out; the one that needs a look
    is drawn; the filter box shows the deployments whose names contain its text."""
    many = [("big", 12, 0), *((f"d{i:03d}", 2, 0) for i in range(248)), ("zz-late", 2, 1)]
    with head_of_many(many) as (address, _):
        browser.get(f"http://{address}/")  # type: ignore[attr-defined]
        wait_until(browser, "return document.querySelectorAll('#deployments tbody tr').length > 0")
        assert len(texts(browser, "#deployments tr[data-deployment]")) == 200
        assert texts(browser, '#deployments tr[data-more="deployments"]') == [
            "50 more deployments: filter by name to see them"
        ]
        # zz-late has a replica not READY: it is among the 200, and its replicas are drawn.
        assert texts(browser, '#deployments tr[data-deployment="zz-late"] .count') == ["1 / 2"]
        replicas = texts(browser, "#replicas tr[data-replica] td:nth-child(2)")
        assert len(replicas) <= 200 and {"zz-late-00", "zz-late-01"} <= set(replicas)
        assert [r for r in replicas if r.startswith("big-")] == [f"big-{i:02d}" for i in range(5)]
        assert texts(browser, '#replicas tr[data-more="replicas-of:big"]') == [
            "big: 7 more replicas (7 READY)"
        ]
        [left] = texts(browser, '#replicas tr[data-more="replicas"]')
        shown = {r.rsplit("-", 1)[0] for r in replicas}
        hidden = 250 - len(shown)
        assert left == f"{2 * hidden} more replicas of {hidden} more deployments: filter by name to see them"

        browser.find_element("id", "filter").send_keys("d24")  # type: ignore[attr-defined]
        wait_until(
            browser, "return document.querySelectorAll('#deployments tr[data-deployment]').length === 8"
        )
        assert texts(browser, "#deployments tr.more") == [] and texts(browser, "#replicas tr.more") == []
        assert len(texts(browser, "#replicas tr[data-replica]")) == 16
        logged = browser.get_log("browser")  # type: ignore[attr-defined]
        assert not [e for e in logged if e["level"] == "SEVERE"], logged


def test_a_scheduler_late_taking_routing_tables_is_shown_so(browser: object) -> None:
    """A scheduler the head counts late taking its routing tables (its requests may follow an
    older one) reads "ALIVE (tables late)" in the schedulers table, with a title saying why,
    as ``shoal status`` shows it; one that is not reads "ALIVE"."""
    for late, shown in ((True, "ALIVE (tables late)"), (False, "ALIVE")):
        with head_of_many([("echo", 1, 0)], tables_late=late) as (address, _):
            browser.get(f"http://{address}/")  # type: ignore[attr-defined]
            wait_until(browser, "return document.querySelectorAll('#schedulers tbody tr').length > 0")
            assert texts(browser, '#schedulers tr[data-scheduler="s1"] td.state') == [shown]
            title = browser.execute_script(  # type: ignore[attr-defined]
                "return document.querySelector('#schedulers tr[data-scheduler=\"s1\"] td.state').title"
            )
            assert ("routing tables" in title) is late, title


def test_the_dashboard_asks_a_slow_or_failing_head_once_at_a_time_and_less_often(browser: object) -> None:
    """The page polled with setInterval(2 s): against a head taking 2.5 s to answer, a poll
    started while the last still waited, and a failing head was asked every 2 s. Now one
    poll at a time, each after a gap that grows with the time the last took (twice it) and
    doubles after each failure. Gaps are lower bounds here (a timer never fires early). On
    ?refresh=0.5 (a gap of 0.5 s, not 2): the same rules, a quarter of the wait."""
    with head_of_many([("echo", 1, 0)]) as (address, gate):
        browser.get(f"http://{address}/?refresh=0.5")  # type: ignore[attr-defined]
        wait_until(browser, "return document.querySelector('tr[data-deployment=\"echo\"] .count')")

        gate.failing = True
        start = len(gate.asked)
        deadline = time.monotonic() + 40
        while len(gate.asked) < start + 3:  # the gaps after two failures: 1 s, then 2 s
            assert time.monotonic() < deadline, gate.asked
            time.sleep(0.05)
        came = [c for c, _ in gate.asked[start:]]
        assert came[1] - came[0] >= 1.0 and came[2] - came[1] >= 2.0, came
        assert "503" in browser.find_element("id", "updated").text  # type: ignore[attr-defined]

        gate.failing = False
        gate.delay_s = 0.8
        # A range chosen polls now: no wait for the 4 s gap.
        from selenium.webdriver.support.ui import Select

        Select(browser.find_element("id", "range")).select_by_visible_text("15 min")  # type: ignore[attr-defined]
        start = len(gate.asked)
        deadline = time.monotonic() + 40
        while len(gate.asked) < start + 3:
            assert time.monotonic() < deadline, gate.asked
            time.sleep(0.2)
        asked = gate.asked[start:]
        # Never two at once, and after a poll that took 0.8 s, 1.6 s before the next.
        assert gate.most_inside == 1
        for (_, answered), (came_next, _) in itertools.pairwise(asked):
            assert came_next - answered >= 1.5, asked
        # The page never threw (the 503s are logged as the network's).
        logged = browser.get_log("browser")  # type: ignore[attr-defined]
        assert not [e for e in logged if e["level"] == "SEVERE" and e["source"] != "network"], logged
