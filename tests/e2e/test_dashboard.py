"""The dashboard in headless Chromium, driven by Selenium: it lists the running
deployment and its replica count, charts traffic, and shows a killed replica
in the events. A screenshot is saved to test-artifacts/dashboard.png."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Up, shoal, wait_ready

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


def test_dashboard_shows_deployments_traffic_and_events(up: Up, browser: object) -> None:
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
    # Traffic makes data points appear in the deployment's charts.
    x = json.dumps({"x": [[float(i) for i in range(16)]]})
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        shoal("predict", "echo", "--data", x, head=up.head)
    points = wait_until(
        browser,
        "const c = document.querySelector('.chart[data-deployment=\"echo\"]');"
        "return c && Number(c.dataset.points) > 0 && Number(c.dataset.points)",
    )
    assert int(points) >= 1  # type: ignore[call-overload]
    # A killed replica shows up in the events.
    echo = next(d for d in status["deployments"] if d["name"] == "echo")
    os.kill(echo["replicas"][0]["pid"], signal.SIGKILL)
    text = wait_until(
        browser,
        "const e = document.querySelector('#events li[data-kind=\"replica_died\"]');"
        "return e && e.textContent",
    )
    assert echo["replicas"][0]["id"] in str(text)
    wait_until(
        browser,
        "return document.querySelector('tr[data-deployment=\"echo\"] .count')?.textContent === '1 / 1'",
    )
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))  # type: ignore[attr-defined]
