"""Measure heads on etcd under faults, for docs/reliability.md (issue 16).

    .venv/bin/python scripts/failover_figures.py [--json]

Starts a 3-member etcd cluster on loopback, two ``shoal head --store etcd://...`` processes
(one leads, one stands by), one ``shoal scheduler --head a,b`` and ``examples/echo.py`` with
2 replicas, all with the short intervals of ``shoal.testing.cluster.FAST`` (``dead_after``
2 s, so the leader lease lasts 1 s). Under load (4 callers in a closed loop on the
scheduler's native ingress, and a control client calling ``status`` every 50 ms through
both heads) it then

1. kills one etcd member (kill -9), and
2. kills the leading head (kill -9),

restarting a head that exits (as its supervisor would: a head that loses leadership exits),
and reports for each: requests and failed requests (inference and control), the time until
a head serves as leader, and the time until a deploy made right after the fault is applied
and until its replica is READY. Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shoal.core.spec import parse_spec
from shoal.errors import ShoalError
from shoal.rpc.clients import ControlClient, send_request
from shoal.testing.etcd import EtcdCluster, EtcdHeads, echo_spec, wait_ready

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass
class Load:
    requests: int = 0
    failed: int = 0
    control: int = 0
    control_failed: int = 0
    errors: list[str] = field(default_factory=list)
    head_exits: list[str] = field(default_factory=list)


@dataclass
class Figure:
    fault: str
    requests: int
    failed: int
    control_calls: int
    control_failed: int
    leader_after_s: float
    deploy_applied_after_s: float
    deploy_ready_after_s: float
    errors: list[str]
    head_exits: list[str]


def serving(http_address: str) -> bool:
    """Whether the head at ``http_address`` leads and serves (its /healthz is not standby)."""
    try:
        with urllib.request.urlopen(f"http://{http_address}/healthz", timeout=1) as reply:
            return bool(json.loads(reply.read()).get("status") != "standby")
    except OSError:
        return False


async def leader_after(heads: EtcdHeads, since: float) -> float:
    while True:
        for head in heads.heads:
            if head.alive() and await asyncio.to_thread(serving, head.endpoints["head_http"]):
                return time.monotonic() - since
        await asyncio.sleep(0.02)


async def measure(
    heads: EtcdHeads, client: ControlClient, load: Load, fault: str, act: Any, deploy: str
) -> Figure:
    before = asdict(load)
    await asyncio.sleep(2)  # load before the fault
    start = time.monotonic()
    act()
    leader = asyncio.create_task(leader_after(heads, start))
    await client.apply(parse_spec(echo_spec(deploy, 1, EXAMPLES)))  # retried until a leader takes it
    applied = time.monotonic() - start
    await wait_ready(client, deploy, 1, timeout_s=60)
    ready = time.monotonic() - start
    leader_s = await leader
    await asyncio.sleep(2)  # load after recovery
    return Figure(
        fault,
        load.requests - before["requests"],
        load.failed - before["failed"],
        load.control - before["control"],
        load.control_failed - before["control_failed"],
        round(leader_s, 2),
        round(applied, 2),
        round(ready, 2),
        load.errors[len(before["errors"]) :],
        load.head_exits[len(before["head_exits"]) :],
    )


async def run(root: Path) -> list[Figure]:
    with EtcdCluster(root / "etcd", size=3) as etcd:
        heads = EtcdHeads(root, etcd)
        try:
            await asyncio.to_thread(heads.start_head)
            first = ControlClient(heads.addresses, heads.settings)
            await first.status()  # retried until the only head leads
            await first.close()
            await asyncio.to_thread(heads.start_head)
            await asyncio.to_thread(heads.start_scheduler)
            assert heads.scheduler is not None
            client = heads.client()
            await client.apply(parse_spec(echo_spec("echo", 2, EXAMPLES)))
            await wait_ready(client, "echo", 2)
            load, stop = Load(), asyncio.Event()
            x = np.ones((1, 16), dtype=np.float32)
            scheduler = heads.scheduler.endpoints["scheduler"]

            async def infer() -> None:
                while not stop.is_set():
                    try:
                        await send_request(scheduler, "echo", {"x": x}, heads.settings, timeout_s=30)
                        load.requests += 1
                    except ShoalError as err:
                        load.requests += 1
                        load.failed += 1
                        load.errors.append(f"inference: {err}")

            async def control() -> None:
                while not stop.is_set():
                    try:
                        await client.status()
                        load.control += 1
                    except ShoalError as err:
                        load.control += 1
                        load.control_failed += 1
                        load.errors.append(f"control: {err}")
                    await asyncio.sleep(0.05)

            async def supervise() -> None:
                # As systemd or Kubernetes would: a head that exited starts again on its ports.
                while not stop.is_set():
                    for head in heads.heads:
                        if not head.alive() and head.proc is not None and head.proc.returncode is not None:
                            load.head_exits.append(f"{head.name} exited with {head.proc.returncode}")
                            await asyncio.to_thread(heads.restart_head, head)
                    await asyncio.sleep(0.2)

            figures = []
            async with asyncio.TaskGroup() as tg:
                for _ in range(4):
                    tg.create_task(infer())
                tg.create_task(control())
                tg.create_task(supervise())
                figures.append(
                    await measure(
                        heads, client, load, "kill -9 one of the 3 etcd members", lambda: etcd.kill(0), "d1"
                    )
                )
                async with asyncio.timeout(30):  # the other head stands by again (or leads)
                    while not all(h.alive() for h in heads.heads):
                        await asyncio.sleep(0.1)
                leading = next(h for h in heads.heads if serving(h.endpoints["head_http"]))
                figures.append(
                    await measure(heads, client, load, "kill -9 the leading head", leading.kill_all, "d2")
                )
                stop.set()
            await client.close()
            return figures
        finally:
            await asyncio.to_thread(heads.close)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--keep", metavar="DIR", help="keep the processes' logs and data in DIR")
    args = parser.parse_args()
    if args.keep:
        figures = asyncio.run(run(Path(args.keep)))
    else:
        with tempfile.TemporaryDirectory(prefix="shoal-failover-") as tmp:
            figures = asyncio.run(run(Path(tmp)))
    if args.json:
        print(json.dumps([asdict(f) for f in figures], indent=2))
        return 0
    print(
        "| fault | requests | failed | control calls | failed | a head leads after "
        "| deploy applied after | its replica READY after |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for f in figures:
        print(
            f"| {f.fault} | {f.requests} | {f.failed} | {f.control_calls} | {f.control_failed} | "
            f"{f.leader_after_s} s | {f.deploy_applied_after_s} s | {f.deploy_ready_after_s} s |"
        )
    for f in figures:
        for line in [*f.head_exits, *f.errors[:5]]:
            print(f"{f.fault}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
