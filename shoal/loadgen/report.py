"""What a run measured, as JSON (:func:`summarize`) and as the table (:func:`render`); the
progress line on stderr (:class:`Progress`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from shoal.loadgen.loops import Counters, Plan, Result


def summarize(result: Result, plan: Plan, workers: int) -> dict[str, Any]:
    """The JSON document ``--json`` prints."""
    lat = np.frombuffer(result.latencies_ns, dtype=np.int64) / 1e6 if result.ok else np.zeros(0)
    elapsed = max(result.ended - result.started, 1e-9) if result.ok or result.errors else 0.0
    errors = sum(result.errors.values())

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 3) if lat.size else None

    return {
        "model": plan.model,
        "protocol": plan.protocol,
        "address": plan.address,
        "mode": "open" if plan.rate else "closed",
        "concurrency": plan.concurrency,
        "rate": plan.rate or None,
        "workers": workers,
        "requests": result.ok + errors,
        "ok": result.ok,
        "errors": errors,
        "errors_by_kind": dict(sorted(result.errors.items())),
        "duration_s": round(elapsed, 3),
        "throughput_rps": round(result.ok / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "max": round(float(lat.max()), 3) if lat.size else None,
            "mean": round(float(lat.mean()), 3) if lat.size else None,
        },
        "client_cpu_s": round(result.cpu_s, 2),
        "client_cpu_share": round(result.cpu_s / elapsed, 3) if elapsed else 0.0,
        "warmup_requests": result.warmup_requests,
    }


def render(doc: Mapping[str, Any]) -> str:
    """The human table."""
    lat = doc["latency_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    load = (
        f"open loop, {doc['rate']:g} req/s, at most {doc['concurrency']} in flight"
        if doc["mode"] == "open"
        else f"closed loop, concurrency {doc['concurrency']}"
    )
    rows = [
        ("target", f"{doc['protocol']}://{doc['address']} model {doc['model']}"),
        ("load", f"{load}, {doc['workers']} worker{'s' if doc['workers'] > 1 else ''}"),
        ("duration", f"{doc['duration_s']:.2f} s"),
        ("requests", f"{doc['requests']} (ok {doc['ok']}, errors {doc['errors']})"),
    ]
    for kind, n in doc["errors_by_kind"].items():
        rows.append(("  error", f"{kind}: {n}"))
    rows += [
        ("throughput", f"{doc['throughput_rps']:.1f} req/s"),
        (
            "latency ms",
            f"p50 {ms(lat['p50'])}  p90 {ms(lat['p90'])}  p99 {ms(lat['p99'])}  max {ms(lat['max'])}",
        ),
        ("client CPU", f"{doc['client_cpu_share'] * 100:.0f}% of one core ({doc['client_cpu_s']:.1f} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


class Progress:
    """The live line on stderr: redrawn in a terminal, else one line a second when asked."""

    def __init__(self, enabled: bool, tty: bool) -> None:
        self.enabled = enabled or tty
        self.tty = tty
        self.t0 = time.monotonic()
        self.last = (self.t0, 0)

    def __call__(self, counters: Counters) -> None:
        if not self.enabled:
            return
        ok, err = counters.total()
        now = time.monotonic()
        rate = (ok - self.last[1]) / max(now - self.last[0], 1e-9)
        self.last = (now, ok)
        line = f"{now - self.t0:6.1f}s  {ok} ok  {err} errors  {rate:,.0f} req/s"
        if self.tty:
            sys.stderr.write(f"\r{line}\033[K")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
