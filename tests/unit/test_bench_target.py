"""Where ``shoal bench`` sends its load without ``--url``: the inference port ``shoal up``
prints, not the scheduler's control port."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shoal.errors import Unavailable
from shoal.loadgen.cli import default_target, local_endpoints

pytestmark = pytest.mark.timeout(30)


def scheduler(n: int, state: str = "ALIVE") -> dict[str, Any]:
    """As the head's status lists it: the control address it registered, and its HTTP port."""
    return {
        "id": f"s{n}",
        "state": state,
        "address": f"10.0.0.{n}:4633{n}",
        "http_address": f"10.0.0.{n}:8000",
    }


# What a scheduler with ingress workers writes: its inference ports and, apart, its control port.
HERE = {
    "scheduler": "10.0.0.2:8001",
    "scheduler_http": "10.0.0.2:8000",
    "scheduler_control": "10.0.0.2:46332",
}


@pytest.mark.parametrize(
    ("protocol", "target"),
    [("grpc", "10.0.0.2:8001"), ("native", "10.0.0.2:8001"), ("http", "10.0.0.2:8000")],
)
def test_the_scheduler_on_this_machine_is_loaded_on_its_inference_port(protocol: str, target: str) -> None:
    """grpc and native (SendRequest) on the inference gRPC port, http on the HTTP port; the
    local scheduler even when the head lists another first."""
    assert default_target(protocol, [scheduler(1), scheduler(2)], HERE) == target


def test_a_state_folder_of_another_cluster_or_a_dead_scheduler_is_not_used() -> None:
    other = {**HERE, "scheduler_control": "10.0.0.9:46339"}
    assert default_target("grpc", [scheduler(1), scheduler(2)], other) == "10.0.0.1:46331"
    # The local one is dead: the first live one, on the address the head knows.
    assert default_target("grpc", [scheduler(2, "DEAD"), scheduler(1)], HERE) == "10.0.0.1:46331"
    assert default_target("http", [scheduler(2, "DEAD"), scheduler(1)], HERE) == "10.0.0.1:8000"


def test_without_a_local_scheduler_the_head_s_addresses_are_used() -> None:
    assert default_target("native", [scheduler(1)], {}) == "10.0.0.1:46331"
    assert default_target("http", [scheduler(1)], {}) == "10.0.0.1:8000"
    with pytest.raises(Unavailable, match="no live scheduler"):
        default_target("grpc", [scheduler(1, "DEAD")], HERE)


def test_local_endpoints_reads_the_state_folder_and_shrugs_at_what_is_not_there(tmp_path: Path) -> None:
    assert local_endpoints(tmp_path) == {}
    (tmp_path / "endpoints.json").write_text(json.dumps({**HERE, "odd": 3}))
    assert local_endpoints(tmp_path) == HERE
    (tmp_path / "endpoints.json").write_text("{half")
    assert local_endpoints(tmp_path) == {}
    (tmp_path / "endpoints.json").write_text("[1]")
    assert local_endpoints(tmp_path) == {}


def test_a_head_that_is_not_running_is_named_in_the_message_the_cli_and_api_share() -> None:
    import socket

    from shoal.cli import build_parser
    from shoal.errors import HeadUnreachable
    from shoal.loadgen.cli import cmd_bench

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # nobody listens there once closed
    args = build_parser().parse_args(["--head", address, "bench", "echo", "-n", "1"])
    with pytest.raises(HeadUnreachable) as err:
        cmd_bench(args)
    assert str(err.value).startswith(f"cannot reach the head at {address} (")
    assert "Start one with 'shoal up' or point --head / SHOAL_HEAD at it, or give --url HOST:PORT" in str(
        err.value
    )
