"""Load that moves between models, as bench/run moves it: how soon does shoal follow?

Starts two ``shoal up`` clusters as ``bench/run`` starts shoal (its four deployments: noop
and sklearn, each without and with batching; two ingress processes), one with
``replica_pin_interval_s`` at ``--old`` seconds, one at ``--new``. Each round, each
cluster in turn (the order reversed every round): perf_analyzer c=32 on ``sklearn_batch``,
then on ``noop`` and ``noop_batch`` right after, three 1 s windows each, as bench/run's
paired windows follow one another. Prints the requests a second per round and the median
of the per-round ratios new/old for the two noop models. Not part of ``make test``::

    .venv/bin/python bench/pin_follow.py --rounds 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import systems  # noqa: E402 - bench/ is not a package

PERF_ANALYZER = BENCH / ".peers" / "perf-analyzer" / "perf_analyzer"
LOADS = (("sklearn_batch", "input:1,64"), ("noop", "x:1,16"), ("noop_batch", "x:1,16"))


def load(url: str, model: str, shape: str) -> float:
    """perf_analyzer c=32 over gRPC as bench/run runs it: requests a second."""
    argv = [str(PERF_ANALYZER), "-m", model, "-u", url, "-i", "grpc", "--shape", shape]
    argv += ["--concurrency-range", "32", "-p", "1000", "-s", "1000", "-r", "3"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout
    rate = [line for line in out.splitlines() if "Throughput:" in line]
    if not rate:
        raise SystemExit(f"perf_analyzer gave no figures:\n{out[-2000:]}")
    return float(rate[-1].split("Throughput:")[1].split()[0])


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--rounds", type=int, default=8)
    args.add_argument("--old", type=float, default=1.0, help="replica_pin_interval_s of the first cluster")
    args.add_argument("--new", type=float, default=0.25, help="replica_pin_interval_s of the second")
    opts = args.parse_args()
    if not PERF_ANALYZER.exists():
        raise SystemExit("needs perf_analyzer: .venv/bin/python bench/peers.py perf-analyzer")
    runs: dict[str, systems.Running] = {}
    try:
        for name, interval in (("old", opts.old), ("new", opts.new)):
            os.environ["SHOAL_REPLICA_PIN_INTERVAL_S"] = str(interval)
            runs[name] = systems.SYSTEMS["shoal"].start(Path(tempfile.mkdtemp(prefix=f"shoal-pin-{name}-")))
        ratios: dict[str, list[float]] = {"noop": [], "noop_batch": []}
        for i in range(opts.rounds):
            got: dict[str, dict[str, float]] = {}
            for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
                got[name] = {model: load(runs[name].grpc, model, shape) for model, shape in LOADS}
            for model in ratios:
                ratios[model].append(got["new"][model] / got["old"][model])
            seen = (f"{n} noop {g['noop']:,.0f} noop_batch {g['noop_batch']:,.0f}" for n, g in got.items())
            print(f"round {i + 1}: " + ", ".join(seen), flush=True)
        for model, r in ratios.items():
            print(
                f"{model}: new/old median {statistics.median(r):.3f} (per round {min(r):.3f}-{max(r):.3f}, "
                f"{sum(x > 1 for x in r)} of {len(r)} above 1)"
            )
    finally:
        for run in runs.values():
            systems.stop(run)


if __name__ == "__main__":
    main()
