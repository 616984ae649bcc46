"""The report of a chaos run: requests, failures by kind, each fault's recovery, latency
before, during and after faults (:func:`summarize`), and the table people read (:func:`render`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from shoal.chaos.load import Sample, latency_stats

if TYPE_CHECKING:
    from shoal.chaos.engine import Chaos


def summarize(chaos: Chaos, duration_s: float, settle_s: float) -> dict[str, Any]:
    """What a finished run measured, as a JSON-ready document (what ``--json`` prints)."""
    assert chaos.load is not None
    samples = chaos.load.samples
    end = max((s.at for s in samples), default=0.0)
    windows = [
        (r.at_s, r.recovered_at_s if r.recovered_at_s is not None else end)
        for r in chaos.records
        if not r.skipped
    ]

    def within(s: Sample, lo: float, hi: float) -> bool:
        return lo <= s.at <= hi

    first = min((w[0] for w in windows), default=end)
    last = max((w[1] for w in windows), default=end)
    during = [s for s in samples if any(within(s, lo, hi) for lo, hi in windows)]
    before = [s for s in samples if s.at < first]
    after = [s for s in samples if s.at > last]
    errors = Counter(s.error for s in samples if s.error is not None)
    elapsed = max(end, 1e-9)
    faults = []
    for r in chaos.records:
        lo, hi = r.at_s, r.recovered_at_s if r.recovered_at_s is not None else end
        stats = latency_stats([s for s in samples if within(s, lo, hi)]) if not r.skipped else {}
        faults.append(
            {
                "kind": r.kind,
                "at_s": r.at_s,
                "target": r.target,
                "recovered_s": r.recovered_s,
                "replacement": r.replacement or None,
                "skipped": r.skipped or None,
                "requests_during": stats.get("requests", 0),
                "failed_during": stats.get("failed", 0),
                "p99_during_ms": stats.get("p99_ms"),
            }
        )
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(r.kind for r in chaos.records):
        recs = [r for r in chaos.records if r.kind == kind and not r.skipped]
        times = [r.recovered_s for r in recs if r.recovered_s is not None]
        kind_samples = [
            s
            for s in samples
            if any(within(s, r.at_s, r.recovered_at_s if r.recovered_at_s is not None else end) for r in recs)
        ]
        by_kind[kind] = {
            "injected": len(recs),
            "skipped": sum(1 for r in chaos.records if r.kind == kind and r.skipped),
            "recovered": len(times),
            "recovery_s": {
                "median": round(float(np.median(times)), 3) if times else None,
                "max": max(times) if times else None,
            },
            **latency_stats(kind_samples),
        }
    return {
        "deployment": chaos.deployment,
        "address": chaos.address,
        "concurrency": chaos.concurrency,
        "rate": chaos.rate or None,
        "duration_s": duration_s,
        "settle_s": settle_s,
        "elapsed_s": round(end, 3),
        "requests": len(samples),
        "ok": len(samples) - sum(errors.values()),
        "failed": sum(errors.values()),
        "errors_by_kind": dict(sorted(errors.items())),
        "error_examples": dict(sorted(chaos.load.examples.items())),
        "failures": [
            {
                "at_s": round(s.at, 3),
                "latency_s": round(s.latency_s, 3),
                "error": s.error,
                "request_id": s.request_id,
            }
            for s in samples
            if s.error is not None
        ][:50],
        "throughput_rps": round(len(samples) / elapsed, 1),
        "latency_ms": {
            "before": latency_stats(before),
            "during": latency_stats(during),
            "after": latency_stats(after),
            "all": latency_stats(samples),
        },
        "by_kind": by_kind,
        "faults": faults,
        "unrecovered": sum(1 for r in chaos.records if r.pending),
        "replicas": chaos.timeline,
    }


def render(doc: Mapping[str, Any]) -> str:
    """The human table."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}s"

    load = f"rate {doc['rate']:g}/s" if doc["rate"] else "closed loop"
    lines = [
        f"shoal chaos: {doc['deployment']} via {doc['address']}, {doc['concurrency']} callers ({load}), "
        f"{doc['duration_s']:g}s of faults, {doc['elapsed_s']:.1f}s in all",
        f"requests  {doc['requests']}  failed {doc['failed']}  ({doc['throughput_rps']:.0f} req/s)",
    ]
    for kind, n in doc["errors_by_kind"].items():
        lines.append(f"  {kind}: {n}  e.g. {doc['error_examples'].get(kind, '')[:120]}")
    lat = doc["latency_ms"]
    lines.append("")
    rows = [["latency", "requests", "failed", "p50 ms", "p99 ms", "max ms"]]
    for phase in ("before", "during", "after"):
        p = lat[phase]
        rows.append(
            [phase, str(p["requests"]), str(p["failed"]), ms(p["p50_ms"]), ms(p["p99_ms"]), ms(p["max_ms"])]
        )
    lines += _table(rows)
    if doc["by_kind"]:
        lines.append("")
        rows = [
            [
                "fault",
                "injected",
                "recovered",
                "recovery median",
                "recovery max",
                "requests",
                "failed",
                "p99 ms",
            ]
        ]
        for kind, k in doc["by_kind"].items():
            rows.append(
                [
                    kind,
                    str(k["injected"]) + (f" (+{k['skipped']} skipped)" if k["skipped"] else ""),
                    str(k["recovered"]),
                    s(k["recovery_s"]["median"]),
                    s(k["recovery_s"]["max"]),
                    str(k["requests"]),
                    str(k["failed"]),
                    ms(k["p99_ms"]),
                ]
            )
        lines += _table(rows)
        lines.append("")
        rows = [["at", "fault", "target", "recovered in", "requests", "failed", "p99 ms"]]
        for f in doc["faults"]:
            rows.append(
                [
                    f"{f['at_s']:.1f}s",
                    f["kind"],
                    f"skipped: {f['skipped']}" if f["skipped"] else f["target"],
                    s(f["recovered_s"]),
                    str(f["requests_during"]),
                    str(f["failed_during"]),
                    ms(f["p99_during_ms"]),
                ]
            )
        lines += _table(rows)
    if doc["unrecovered"]:
        lines.append(f"\n{doc['unrecovered']} fault(s) did not recover in time")
    return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
