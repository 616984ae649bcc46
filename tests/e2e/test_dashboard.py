"""The dashboard in headless Chromium, driven by Selenium, checked as a user reads it:
deployments and replica counts; each replica's pid and in-flight count; charts on one
time axis with a range selector, with gaps where there was no traffic; an error rate
shown only over enough requests; a killed replica in the cluster events; deployment
lifecycle events that are still there after the head restarts. Screenshots are saved
in the test's tmp dir (and the first also to test-artifacts/dashboard.png)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
