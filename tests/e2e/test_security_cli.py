"""Tokens as a user meets them: the CLI's bootstrap and roles against ``shoal up``, and the
dashboard asking for a token once tokens are on."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_predict_with_an_infer_token_names_its_scheduler(up: Up, examples_dir: Path, tmp_path: Path) -> None:
    """docs/security.md's client: a token of role infer, named in a deployment's
    ``auth.tokens``, sent with ``shoal predict --token``. Finding the schedulers is a read
    of the head's status, which such a token may not do: with ``--scheduler`` it needs no
    head; without it, the error says to give one (it used to say only that GetStatus
    needs role read, with --scheduler too)."""
    wait_ready(up, "echo", 1)
    admin = shoal("token", "create", "--role", "admin", "--name", "ops", head=up.head).stdout.strip()
    app = shoal("token", "create", "--role", "infer", "--name", "web-app", "--token", admin, head=up.head)
    spec = tmp_path / "guarded.yaml"
    spec.write_text(
        f"name: guarded\nbackend: python\nmodel: 'echo:Echo'\nbase_dir: {examples_dir}\n"
        "resources: {cpus: 0.1}\nauth: {tokens: [web-app]}\n"
    )
    shoal("deploy", str(spec), "--token", admin, head=up.head)
    data = '{"x": [[1, 2]]}'
    token = app.stdout.strip()
    answered = shoal(
        "predict",
        "guarded",
        "--data",
        data,
        "--token",
        token,
        "--scheduler",
        up.endpoints["scheduler"],
        head=up.head,
    )
    assert json.loads(answered.stdout) == {"x": [[1.0, 2.0]]}
    refused = shoal("predict", "guarded", "--data", data, "--token", token, head=up.head, check=False)
    assert refused.returncode == 1
    assert "needs role read" in refused.stderr and "--scheduler" in refused.stderr, refused.stderr
