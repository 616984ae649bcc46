"""``python -m shoal.testing.netns nfqueue|sweep``: the helpers run inside a namespace."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from shoal.testing.netns.hosts import sweep_stale
from shoal.testing.netns.nfqueue import nfqueue_loop


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shoal.testing.netns")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("nfqueue", help="delay and drop the packets of an NFQUEUE (runs in a namespace)")
    p.add_argument("--queue", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--loss-pct", type=float, default=0.0)
    sub.add_parser("sweep", help="delete namespaces left by test runs that are gone")
    args = parser.parse_args(argv)
    if args.command == "nfqueue":
        nfqueue_loop(args.queue, args.delay_ms, args.loss_pct)
    else:
        for name in sweep_stale():
            print(f"deleted {name}")


if __name__ == "__main__":
    main()
