"""What one whole-cluster status costs the head: ``status_of`` (the typed status, built under
the head's lock on its event loop) and ``ClusterStatus.to_json``, at N simulated replicas.
Not part of ``make test``; in one process, no sockets::

    .venv/bin/python bench/status_build.py                       # 10,000 replicas
    .venv/bin/python bench/status_build.py --replicas 1000 --rounds 20
    .venv/bin/python bench/status_build.py --profile             # cProfile of status_of

A ``HeadNode`` over a ``MemoryStore`` and fake schedulers, as the unit tests build one:
``--replicas / 5`` deployments applied (one in ten applied twice, so that its replicas run
two revisions; one in 20 autoscaled), ``--schedulers`` schedulers registered with the
replicas already running (one in 7 STARTING with a message). Each round times ``status_of``
and ``to_json`` once each, and ``--pollers`` calls of ``HeadNode.status()`` made together
while the lock is held, from its release until the last returns (they share one build);
the medians and the best are printed, in milliseconds, with the JSON's size.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import time

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import READY, STARTING, ReplicaReport
from shoal.core.placement import Capacity
from shoal.core.spec import parse_spec
from shoal.head.node import HeadNode, status_of
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration


async def build(replicas: int, schedulers: int) -> HeadNode:
    """A head knowing ``replicas`` replicas of ``replicas // 5`` deployments on ``schedulers``."""
    head = HeadNode(Settings(), MemoryStore(), FakeSchedulers(), FakeClock())
    per = 5
    deployments = max(1, replicas // per)
    hashes: dict[str, list[str]] = {}
    for d in range(deployments):
        name = f"model-{d:05d}"
        doc: dict[str, object] = {"name": name, "backend": "python", "model": "m:M", "replicas": per}
        if d % 20 == 0:
            doc["autoscaling"] = {"min_replicas": 1, "max_replicas": 8}
        spec = parse_spec(doc)
        await head.apply(spec)
        hashes[name] = [spec.process_hash()]
        if d % 10 == 0:
            newer = parse_spec({**doc, "options": {"v": 2}})
            await head.apply(newer)
            hashes[name].append(newer.process_hash())
    reports: list[list[ReplicaReport]] = [[] for _ in range(schedulers)]
    n = 0
    for name, specs in hashes.items():
        for r in range(per):
            starting = n % 7 == 0
            reports[n % schedulers].append(
                ReplicaReport(
                    f"{name}-r{r}",
                    name,
                    STARTING if starting else READY,
                    address=f"10.0.{n // 250}.{n % 250}:9000",
                    pid=1000 + n,
                    in_flight=n % 3,
                    queued=n % 2,
                    spec_hash=specs[r % len(specs)],
                    message="loading weights" if starting else "",
                )
            )
            n += 1
    for i, reps in enumerate(reports):
        sid = f"sched-{i:04d}"
        await head.register_scheduler(
            SchedulerRegistration(
                sid, f"{sid}:7000", f"{sid}:7001", Capacity(512, 10**7, 0), 100 + i, f"host{i}", tuple(reps)
            )
        )
    return head


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=10_000)
    parser.add_argument("--schedulers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--profile", action="store_true", help="cProfile status_of, top 25 by own time")
    parser.add_argument(
        "--pollers", type=int, default=8, help="whole-cluster status() calls queued together behind the lock"
    )
    parser.add_argument("--dump", metavar="PATH", help="write the status's JSON there (to compare two trees)")
    args = parser.parse_args()
    head = await build(args.replicas, args.schedulers)
    try:
        status_of(head)  # warm: the first build fills caches the later ones read
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.rounds):
                status_of(head)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            return
        built, dumped = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            status = status_of(head)
            t1 = time.perf_counter()
            doc = status.to_json()
            t2 = time.perf_counter()
            built.append((t1 - t0) * 1000)
            dumped.append((t2 - t1) * 1000)
        size = len(json.dumps(doc))
        if args.dump:
            # The events' times are the wall clock's at setup: left out, two runs differ there.
            events = [{**e, "at": 0} for e in doc["events"]]
            with open(args.dump, "w") as f:
                json.dump({**doc, "events": events}, f)
        count = sum(len(d.replicas) for d in status.deployments)
        print(
            f"{count} replicas, {len(status.deployments)} deployments, {len(status.schedulers)} schedulers, "
            f"JSON {size / 1e6:.2f} MB"
        )
        together = []
        for _ in range(args.rounds):
            async with head.lock:  # a control call the pollers wait behind
                calls = [asyncio.create_task(head.status()) for _ in range(args.pollers)]
                await asyncio.sleep(0)
            t0 = time.perf_counter()
            await asyncio.gather(*calls)
            together.append((time.perf_counter() - t0) * 1000)
        for label, ms in (("status_of", built), ("to_json", dumped), (f"{args.pollers} status()", together)):
            print(f"{label:>12}: median {statistics.median(ms):7.1f} ms  best {min(ms):7.1f} ms")
    finally:
        await head.aclose()


if __name__ == "__main__":
    asyncio.run(main())
