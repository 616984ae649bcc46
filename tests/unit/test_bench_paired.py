"""bench/report.py's paired-window verdicts: per-alternation ratios, medians, gaps."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest

# bench/ is not a package, and its module names could shadow others (it once held a
# profile.py, the standard library's name) for the rest of this process if it stayed on the path.
_BENCH = str(Path(__file__).resolve().parents[2] / "bench")
sys.path.insert(0, _BENCH)
try:
    import report
finally:
    sys.path.remove(_BENCH)


def point(
    alt: int, system: str, variant: str, workload: str, c: int, thr: float, **kw: Any
) -> dict[str, Any]:
    tool, protocol = kw.pop("tool", ("perf_analyzer", "grpc"))
    return {
        "alternation": alt,
        "system": system,
        "variant": variant,
        "workload": workload,
        "concurrency": c,
        "tool": tool,
        "protocol": protocol,
        "throughput": thr,
        "p50_ms": kw.pop("p50", None),
        "failed": kw.pop("failed", ""),
        "others_cpu": 0.01,
    }


def doc(points: list[dict[str, Any]]) -> dict[str, Any]:
    return {"settings": {"concurrency": [1, 32], "paired": 3}, "paired": points}


def test_ratios_pair_points_of_the_same_alternation_only() -> None:
    points = [
        point(1, "floor-grpc", "-", "noop", 32, 1000),
        point(1, "shoal", "nobatch", "noop", 32, 900),
        point(2, "floor-grpc", "-", "noop", 32, 2000),
        point(2, "shoal", "nobatch", "noop", 32, 2200),
        point(3, "shoal", "nobatch", "noop", 32, 5000),  # its floor point is missing: no ratio
    ]
    rs = report.paired_ratios(
        doc(points), "noop", 32, "perf_analyzer grpc", ("shoal", "nobatch"), ("floor-grpc", "-")
    )
    assert rs == pytest.approx([0.9, 1.1])


def test_a_failed_window_is_left_out() -> None:
    points = [
        point(1, "floor-grpc", "-", "noop", 32, 1000),
        point(1, "shoal", "nobatch", "noop", 32, 0, failed="exit 1"),
        point(2, "floor-grpc", "-", "noop", 32, 1000),
        point(2, "shoal", "nobatch", "noop", 32, 800),
    ]
    rs = report.paired_ratios(
        doc(points), "noop", 32, "perf_analyzer grpc", ("shoal", "nobatch"), ("floor-grpc", "-")
    )
    assert rs == pytest.approx([0.8])


def test_verdicts_take_the_median_and_the_better_shoal_variant() -> None:
    points = []
    for alt, (floor, nobatch, batch, pytriton) in enumerate(
        [(1000, 700, 800, 600), (1000, 900, 760, 500), (1000, 800, 700, 700)], start=1
    ):
        points += [
            point(alt, "floor-grpc", "-", "noop", 32, floor),
            point(alt, "shoal", "nobatch", "noop", 32, nobatch),
            point(alt, "shoal", "batch", "noop", 32, batch),
            point(alt, "pytriton", "batch", "noop", 32, pytriton),
        ]
    lines = report.paired_targets(doc(points))
    floor_line = next(line for line in lines if "grpc.aio floor" in line)
    # nobatch: 0.7, 0.9, 0.8 -> median 0.80; batch: 0.8, 0.76, 0.7 -> 0.76; the better is shown.
    assert "shoal/nobatch 0.80x (from 0.70 to 0.90 over 3 alternations)" in floor_line
    assert "**milestone met**, target not" in floor_line
    pyt_line = next(line for line in lines if "PyTriton" in line)
    # nobatch / pytriton: 1.17, 1.8, 1.14 -> 1.17 (batch: 1.33, 1.52, 1.0 -> 1.33, the better).
    assert "shoal/batch 1.33x" in pyt_line and "**met**" in pyt_line


def test_latency_target_is_a_ratio_of_p50s_where_smaller_is_better() -> None:
    points = [
        point(1, "floor-grpc", "-", "noop", 1, 1500, p50=0.5),
        point(1, "shoal", "nobatch", "noop", 1, 800, p50=1.3),
        point(2, "floor-grpc", "-", "noop", 1, 1500, p50=0.5),
        point(2, "shoal", "nobatch", "noop", 1, 800, p50=0.9),
    ]
    (line,) = report.paired_targets(doc(points))
    assert (
        "p50 <= 2.0x the floor" in line
        and "shoal/nobatch 2.20x" in line
        and "**milestone met**, target not" in line
    )


def test_no_paired_windows_no_lines() -> None:
    assert report.paired_targets({"settings": {"concurrency": [1, 32]}, "points": []}) == []
    assert report.paired_targets(doc([point(1, "shoal", "batch", "noop", 32, 100)])) == []


def test_the_median_interval_is_the_sign_tests() -> None:
    assert report.median_interval([float(i) for i in range(12, 0, -1)]) == (3.0, 10.0)
    assert report.median_interval([float(i) for i in range(6)]) == (0.0, 5.0), "6: all of them"
    assert report.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None, "5 cannot give 95%"


def test_the_median_interval_holds_the_median_95_percent_of_the_time() -> None:
    # Skewed ratios with a true median of 1.0: the interval must not lean on a shape.
    rng = random.Random(12)
    trials, held = 4000, 0
    for _ in range(trials):
        rs = [rng.lognormvariate(0.0, 0.25) for _ in range(12)]
        interval = report.median_interval(rs)
        assert interval is not None
        held += interval[0] <= 1.0 <= interval[1]
    assert held / trials >= 0.95


def test_a_target_inside_the_interval_is_called_undecided_whichever_side_the_median_is() -> None:
    shoal = [820, 880, 900, 940, 960, 970, 975, 990, 1010, 1050, 1100, 1130]
    points = []
    for alt, thr in enumerate(shoal, start=1):
        points += [
            point(alt, "floor-grpc", "-", "noop", 32, 1000),
            point(alt, "shoal", "batch", "noop", 32, thr),
            point(alt, "pytriton", "batch", "noop", 32, 600),
        ]
    lines = report.paired_targets(doc(points))
    floor_line = next(line for line in lines if "grpc.aio floor" in line)
    assert "0.97x (from 0.82 to 1.13 over 12 alternations; the median's 95% interval 0.90-1.05)" in floor_line
    assert "**milestone met**, target not (the target is inside" in floor_line
    pyt_line = next(line for line in lines if "PyTriton" in line)
    assert "**met**" in pyt_line and "cannot tell" not in pyt_line, "1.37x-1.88x: decided"


def test_the_ceiling_lines_compare_the_split_floor_with_the_floor_and_shoal_with_it() -> None:
    points = []
    for alt, (floor, split, nobatch) in enumerate(
        [(1000, 850, 765), (1000, 800, 720), (1000, 900, 810)], start=1
    ):
        points += [
            point(alt, "floor-grpc", "-", "noop", 32, floor),
            point(alt, "floor-grpc-split", "-", "noop", 32, split),
            point(alt, "shoal", "nobatch", "noop", 32, nobatch),
        ]
    lines = [line for line in report.paired_targets(doc(points)) if "not a target" in line]
    assert len(lines) == 2
    assert "served 0.85x (from 0.80 to 0.90 over 3 alternations) the floor in one" in lines[0]
    assert lines[1].startswith("- (not a target) shoal/nobatch against that ceiling: 0.90x")


def test_no_ceiling_lines_without_the_split_floor() -> None:
    points = [point(1, "floor-grpc", "-", "noop", 32, 1000), point(1, "shoal", "nobatch", "noop", 32, 900)]
    assert not [line for line in report.paired_targets(doc(points)) if "not a target" in line]
