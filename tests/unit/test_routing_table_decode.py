"""A scheduler applies a routing table even when one entry does not parse (issue 13, item 1):
that entry is skipped and logged once, the rest applies."""

from __future__ import annotations

import logging

import pytest

from shoal.core.spec import parse_spec
from shoal.proto import shoal_pb2 as pb
from shoal.rpc.clients import RoutingTableDecoder

pytestmark = pytest.mark.timeout(10)

# What a head before the fix pushed for a spec POSTed with "timeout_s": Infinity.
POISON = '{"name":"poison","backend":"python","model":"echo:Echo","replicas":0,"timeout_s":null}'


def table(version: int, **specs: str) -> pb.RoutingTable:
    msg = pb.RoutingTable(version=version, token_hashes=["h1"])
    for name, spec_json in specs.items():
        entry = msg.deployments[name]
        entry.spec_json = spec_json
        entry.routes.add(replica_id=f"{name}-1", address=f"{name}:9000", scheduler_id="s1")
    return msg


def test_an_entry_that_does_not_parse_is_skipped_and_the_rest_applies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    echo = parse_spec({"name": "echo", "backend": "python", "model": "echo:Echo"})
    decoder = RoutingTableDecoder()

    with caplog.at_level(logging.ERROR, logger="shoal.rpc"):
        decoded = decoder.decode(table(3, echo=echo.to_json(), poison=POISON, junk="{"))
        again = decoder.decode(table(4, echo=echo.to_json(), poison=POISON, junk="{"))

    assert decoded.version == 3 and decoded.token_hashes == ("h1",)
    assert list(decoded.deployments) == ["echo"]
    assert decoded.deployments["echo"].spec == echo
    assert [r.replica_id for r in decoded.deployments["echo"].routes] == ["echo-1"]
    assert list(again.deployments) == ["echo"]
    # Logged once per bad spec, naming the deployment, not at every push.
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 2
    assert any("'poison'" in m and "timeout_s" in m for m in skipped)


def test_an_entry_holding_another_deployments_spec_is_skipped() -> None:
    echo = parse_spec({"name": "echo", "backend": "python", "model": "echo:Echo"})
    decoded = RoutingTableDecoder().decode(table(1, other=echo.to_json()))
    assert decoded.deployments == {}
