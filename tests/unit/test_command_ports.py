"""The ports one command binds must differ (0, a free port, may repeat)."""

from __future__ import annotations

import pytest

from shoal.config import Settings
from shoal.errors import InvalidArgument
from shoal.run import HEAD_PORTS, SCHEDULER_PORTS, check_ports

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("ports", "names", "message"),
    [
        ({"grpc_port": 38101, "http_port": 38101}, SCHEDULER_PORTS, "grpc_port and http_port are both 38101"),
        ({"head_port": 9, "head_http_port": 9}, HEAD_PORTS, "head_port and head_http_port are both 9"),
        (
            {"head_http_port": 9, "http_port": 9},
            HEAD_PORTS + SCHEDULER_PORTS,
            "head_http_port and http_port are both 9",
        ),
    ],
)
def test_two_ports_of_one_command_must_differ(
    ports: dict[str, int], names: tuple[str, ...], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=f"^{message}: each needs a port of its own$"):
        check_ports(Settings().replace(**ports), names)


def test_port_0_may_repeat() -> None:
    ports = dict.fromkeys(HEAD_PORTS + SCHEDULER_PORTS, 0)
    check_ports(Settings().replace(**ports), HEAD_PORTS + SCHEDULER_PORTS)
