"""Tokens as a user meets them: the CLI's bootstrap and roles against ``shoal up``, and the
dashboard asking for a token once tokens are on."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import Up, shoal, wait_ready
from tests.e2e.test_dashboard import browser, wait_until

pytestmark = pytest.mark.timeout(120)
__all__ = ["browser"]  # the fixture, shared with the dashboard's own test


def test_cli_tokens_and_the_dashboard_login(up: Up, browser: object) -> None:
    wait_ready(up, "echo", 1)
    admin = shoal("token", "create", "--role", "admin", "--name", "ops", head=up.head).stdout.strip()
    refused = shoal("status", head=up.head, check=False)
    assert refused.returncode == 1 and "needs a token" in refused.stderr
    reader = shoal("token", "create", "--role", "read", "--token", admin, head=up.head).stdout.strip()
    listed = shoal("token", "list", "--token", admin, head=up.head).stdout
    assert "ops" in listed and "read-" in listed
    denied = shoal("scale", "echo", "2", "--token", reader, head=up.head, check=False)
    assert denied.returncode == 1 and "needs role deploy" in denied.stderr
    status = json.loads(shoal("status", "--json", "--token", reader, head=up.head).stdout)
    assert {d["name"] for d in status["deployments"]} == {"echo", "digits"}

    # The dashboard: 401 from the API, so it asks for a token, keeps it, and shows the cluster.
    browser.get(f"http://{up.endpoints['head_http']}/")  # type: ignore[attr-defined]
    wait_until(browser, "return getComputedStyle(document.getElementById('login')).display === 'flex'")
    browser.execute_script(  # type: ignore[attr-defined]
        "document.getElementById('token').value = arguments[0];"
        "document.getElementById('login').requestSubmit();",
        reader,
    )
    wait_until(browser, "return document.querySelector('#deployments tbody').textContent.includes('echo')")
    assert browser.execute_script("return localStorage.getItem('shoal.token')") == reader  # type: ignore[attr-defined]
    assert (
        browser.execute_script(  # type: ignore[attr-defined]
            "return getComputedStyle(document.getElementById('login')).display"
        )
        == "none"
    )
