"""Turn a results document (bench/results/*.json) into tables: the console summary and
docs/benchmarks.md. Medians over rounds; ratios are taken per round against the floor
measured in the same round with the same tool, then their median is shown."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import systems

Key = tuple[str, str, str, str, int]  # system, variant, workload, tool label, concurrency
ORDER = list(systems.SYSTEMS)
GRPC_TOOLS = ("perf_analyzer grpc", "h2load grpc", "shoal bench grpc", "shoal bench native")
HTTP_TOOLS = ("perf_analyzer http", "wrk http-json")


def label(p: dict[str, Any]) -> str:
    return f"{p['tool']} {p['protocol']}"


def reference(tool: str) -> str:
    """The grpc.aio floor's tool for a row measured with ``tool``."""
    if tool.startswith("h2load"):
        return "h2load grpc"
    if tool.startswith("shoal bench"):
        return "shoal bench grpc"
    return "perf_analyzer grpc"


def aggregate(doc: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    by_round: dict[Key, dict[int, dict[str, Any]]] = defaultdict(dict)
    for p in doc["points"]:
        if p.get("failed"):
            continue
        key = (p["system"], p["variant"], p["workload"], label(p), p["concurrency"])
        by_round[key][p["round"]] = p
    out: dict[Key, dict[str, Any]] = {}
    for key, rounds in by_round.items():
        system, _, workload, tool, c = key
        floor = by_round.get(("floor-grpc", "-", workload, reference(tool), c), {})
        http_floor = by_round.get(("floor-http", "-", workload, "wrk http-json", c), {})

        def ratios(
            ref: dict[int, dict[str, Any]], rounds: dict[int, dict[str, Any]] = rounds
        ) -> float | None:
            rs = [
                p["throughput"] / ref[r]["throughput"]
                for r, p in rounds.items()
                if r in ref and ref[r]["throughput"] > 0
            ]
            return statistics.median(rs) if rs else None

        def med(field: str, rounds: dict[int, dict[str, Any]] = rounds) -> float | None:
            vals = [p[field] for p in rounds.values() if p.get(field) is not None]
            return statistics.median(vals) if vals else None

        out[key] = {
            "throughput": med("throughput"),
            "p50_ms": med("p50_ms"),
            "p99_ms": med("p99_ms"),
            "tool_cpu": med("tool_cpu"),
            "server_cpu": med("server_cpu"),
            "errors": sum(p["errors"] for p in rounds.values()),
            "rounds": len(rounds),
            "x_floor": ratios(floor),
            "x_http_floor": ratios(http_floor) if tool.startswith("wrk") and system != "floor-http" else None,
            "spread": _spread([p["throughput"] for p in rounds.values()]),
        }
    return out


def _spread(values: list[float]) -> float | None:
    if len(values) < 2 or not max(values):
        return None
    return (max(values) - min(values)) / max(values)


def _num(v: float | None, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def _cell(a: dict[str, Any] | None, show_p50: bool, http: bool) -> str:
    if a is None:
        return "-"
    parts = [_num(a["throughput"])]
    if show_p50 and a["p50_ms"] is not None:
        parts.append(f"p50 {a['p50_ms']:.2f}")
    if a["x_floor"] is not None:
        parts.append(f"**{a['x_floor']:.2f}x**")
    if http and a["x_http_floor"] is not None:
        parts.append(f"({a['x_http_floor']:.2f}x S)")
    if a["errors"]:
        parts.append(f"{a['errors']} err")
    return " · ".join(parts)


def _rows(agg: dict[Key, dict[str, Any]], tool_set: tuple[str, ...]) -> list[tuple[str, str, str]]:
    rows = {(k[0], k[1], k[3]) for k in agg if k[3] in tool_set}
    return sorted(
        rows, key=lambda r: (ORDER.index(r[0]) if r[0] in ORDER else 99, r[1], tool_set.index(r[2]))
    )


def _columns(doc: dict[str, Any]) -> list[tuple[str, int]]:
    s = doc["settings"]
    return [(w, c) for w in s["workloads"] for c in s["concurrency"]]


def _table(doc: dict[str, Any], agg: dict[Key, dict[str, Any]], tool_set: tuple[str, ...], http: bool) -> str:
    cols = _columns(doc)
    head = ["system", "variant", "tool"] + [f"{w} c={c}" for w, c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for system, variant, tool in _rows(agg, tool_set):
        name = systems.SYSTEMS[system].label if system in systems.SYSTEMS else system
        cells = [
            _cell(agg.get((system, variant, w, tool, c)), c == min(doc["settings"]["concurrency"]), http)
            for w, c in cols
        ]
        lines.append("| " + " | ".join([name, variant, tool, *cells]) + " |")
    return "\n".join(lines)


def summary(doc: dict[str, Any]) -> str:
    """A plain-text table for the console."""
    agg = aggregate(doc)
    lines = ["", "system/variant            tool                  workload  c   req/s     p50 ms  x floor"]
    for key in sorted(
        agg, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, k[1], k[3], k[2], k[4])
    ):
        a = agg[key]
        ratio = "-" if a["x_floor"] is None else f"{a['x_floor']:.2f}"
        lines.append(
            f"{key[0] + '/' + key[1]:<25} {key[3]:<21} {key[2]:<9} {key[4]:<3} "
            f"{_num(a['throughput']):>8}  {_num(a['p50_ms'], '.2f'):>6}  {ratio}"
        )
    for m in doc.get("memory", []):
        lines.append(f"idle memory {m['system']:<14} {m['rss_mb']:>7.0f} MB RSS  {m['pss_mb']:>7.0f} MB PSS")
    for what, why in doc.get("skipped", {}).items():
        lines.append(f"skipped: {what}: {why}")
    return "\n".join(lines)


# ---------------------------------------------------------------- targets


def _best(
    agg: dict[Key, dict[str, Any]],
    systems_: list[str],
    workload: str,
    c: int,
    tools_: tuple[str, ...],
    variant: str | None = None,
) -> tuple[float | None, str]:
    """The highest ratio to the floor among those rows, and whose it is."""
    best, who = None, ""
    for k, a in agg.items():
        wanted = k[0] in systems_ and k[2] == workload and k[4] == c and k[3] in tools_
        if wanted and (variant is None or k[1] == variant) and a["x_floor"] is not None:
            if best is None or a["x_floor"] > best:
                best, who = a["x_floor"], f"{k[0]}/{k[1]} ({k[3]})"
    return best, who


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def _target(value: float, target: float, milestone: float, *, below: bool = False) -> str:
    """Met, the milestone only, or neither (``below``: smaller is better)."""
    if (value <= target) if below else (value >= target):
        return "**met**"
    if (value <= milestone) if below else (value >= milestone):
        return "**milestone met**, target not"
    return "**NOT met**"


def targets(doc: dict[str, Any], agg: dict[Key, dict[str, Any]]) -> list[str]:
    """One line per target of the data-plane issue (target, then milestone), with the
    numbers behind it: ratios are medians of per-round ratios to the floors."""
    out = []
    c_hi, c_lo = max(doc["settings"]["concurrency"]), min(doc["settings"]["concurrency"])
    pa = ("perf_analyzer grpc",)

    # noop gRPC at c_hi: >= 1.0x the floor (milestone 0.75x) and >= 1.3x PyTriton batching (1.0x).
    s_best, s_who = _best(agg, ["shoal"], "noop", c_hi, pa)
    p_best, _ = _best(agg, ["pytriton"], "noop", c_hi, pa, variant="batch")
    if s_best is not None:
        out.append(
            f"- noop gRPC c={c_hi} (perf_analyzer) >= 1.0x the grpc.aio floor (milestone 0.75x): shoal "
            f"{s_best:.2f}x ({s_who}): {_target(s_best, 1.0, 0.75)}"
        )
        if p_best is not None:
            r = s_best / p_best
            out.append(
                f"- noop gRPC c={c_hi} >= 1.3x PyTriton with batching (milestone 1.0x): PyTriton "
                f"{p_best:.2f}x the floor; shoal/PyTriton = {r:.2f}: {_target(r, 1.3, 1.0)}"
            )
    # noop gRPC at c_lo: p50 <= 2.0x the floor's (milestone 2.5x), batching off and on.
    floor = agg.get(("floor-grpc", "-", "noop", "perf_analyzer grpc", c_lo))
    for variant in ("nobatch", "batch"):
        mine = agg.get(("shoal", variant, "noop", "perf_analyzer grpc", c_lo))
        if mine and floor and mine["p50_ms"] and floor["p50_ms"]:
            r = mine["p50_ms"] / floor["p50_ms"]
            out.append(
                f"- noop gRPC c={c_lo} p50 <= 2.0x the floor's (milestone 2.5x), shoal/{variant}: "
                f"{mine['p50_ms']:.2f} ms against {floor['p50_ms']:.2f} ms, {r:.2f}x: "
                f"{_target(r, 2.0, 2.5, below=True)}"
            )
    # sklearn c_hi with batching, gRPC (perf_analyzer) and HTTP (wrk JSON): >= 1.2x PyTriton (ahead).
    for proto, tools_ in (("gRPC", pa), ("HTTP", ("wrk http-json",))):
        val, _ = _best(agg, ["shoal"], "sklearn", c_hi, tools_, variant="batch")
        pb, _ = _best(agg, ["pytriton"], "sklearn", c_hi, tools_, variant="batch")
        head = f"- sklearn {proto} c={c_hi} with batching >= 1.2x PyTriton with batching (milestone: ahead):"
        if val is None or pb is None:
            out.append(f"{head} **not measured**")
            continue
        r = val / pb
        out.append(
            f"{head} shoal {val:.2f}x the floor, PyTriton {pb:.2f}x; shoal/PyTriton = {r:.2f}: "
            f"{_target(r, 1.2, 1.0 + 1e-9)}"
        )
    # noop HTTP c_hi (wrk): >= 1.0x bare Starlette (milestone 0.75x).
    http = [
        a["x_http_floor"]
        for k, a in agg.items()
        if k[0] == "shoal"
        and k[2] == "noop"
        and k[3] == "wrk http-json"
        and k[4] == c_hi
        and a["x_http_floor"] is not None
    ]
    if http:
        best = max(http)
        out.append(
            f"- noop HTTP c={c_hi} (wrk) >= 1.0x bare Starlette (milestone 0.75x): shoal {best:.2f}x: "
            f"{_target(best, 1.0, 0.75)}"
        )
    # Idle memory, PSS: <= MLServer with parallel_workers 0.
    pss = {m["system"]: m["pss_mb"] for m in doc.get("memory", [])}
    if "shoal" in pss and "mlserver-pw0" in pss:
        out.append(
            f"- idle memory (PSS) <= MLServer with parallel_workers 0: shoal {pss['shoal']:.0f} MB, "
            f"MLServer {pss['mlserver-pw0']:.0f} MB: {_verdict(pss['shoal'] <= pss['mlserver-pw0'])}"
        )
    return out


def _paired_by_alternation(
    doc: dict[str, Any], workload: str, c: int, tool: str
) -> list[dict[tuple[str, str], dict[str, Any]]]:
    """The paired windows of one cell: per alternation, its points by (system, variant)."""
    by_alt: dict[int, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
    for p in doc.get("paired", []):
        if not p.get("failed") and p["workload"] == workload and p["concurrency"] == c and label(p) == tool:
            by_alt[p["alternation"]][(p["system"], p["variant"])] = p
    return [by_alt[a] for a in sorted(by_alt)]


def paired_ratios(
    doc: dict[str, Any],
    workload: str,
    c: int,
    tool: str,
    num: tuple[str, str],
    den: tuple[str, str],
    field: str = "throughput",
) -> list[float]:
    """``num``'s ``field`` over ``den``'s, one ratio per alternation that measured both."""
    out = []
    for alt in _paired_by_alternation(doc, workload, c, tool):
        a, b = alt.get(num), alt.get(den)
        if a and b and a.get(field) and b.get(field):
            out.append(a[field] / b[field])
    return out


def median_interval(rs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """An interval that holds the median of what ``rs`` were drawn from at least ``level``
    of the time, whatever their distribution: the k-th smallest to the k-th largest, k the
    largest with P(Binomial(n, 1/2) < k) <= (1 - level) / 2 (the sign test's interval).
    None when ``rs`` are too few for one (fewer than 6 at 95%). For 12 alternations it is
    the 3rd to the 10th ratio (96%); for 6, all of them (97%)."""
    n, tail, k = len(rs), 0.0, 0
    while k < n:
        p = math.comb(n, k) / 2**n  # P(Binomial(n, 1/2) == k)
        if tail + p > (1 - level) / 2:
            break
        tail, k = tail + p, k + 1
    if k == 0:
        return None
    xs = sorted(rs)
    return xs[k - 1], xs[n - k]


def _ratio_text(rs: list[float]) -> str:
    text = f"{statistics.median(rs):.2f}x (from {min(rs):.2f} to {max(rs):.2f} over {len(rs)} alternations"
    interval = median_interval(rs)
    if interval is not None:
        text += f"; the median's 95% interval {interval[0]:.2f}-{interval[1]:.2f}"
    return text + ")"


def paired_targets(doc: dict[str, Any]) -> list[str]:
    """The targets again, from the paired windows: medians of per-alternation ratios, each
    pair measured seconds apart with both systems up (``suite.paired_pass``)."""
    if not doc.get("paired"):
        return []
    out = []
    c_hi, c_lo = max(doc["settings"]["concurrency"]), min(doc["settings"]["concurrency"])
    pa, wrk = "perf_analyzer grpc", "wrk http-json"
    shoal_variants = (("shoal", "nobatch"), ("shoal", "batch"))

    def best(workload: str, c: int, tool: str, den: tuple[str, str]) -> tuple[list[float], str]:
        found = [(paired_ratios(doc, workload, c, tool, v, den), v[1]) for v in shoal_variants]
        found = [(rs, v) for rs, v in found if rs]
        return max(found, key=lambda f: statistics.median(f[0]), default=([], ""))

    # (the target as said, the ratios, whose, target, milestone, smaller is better)
    rows: list[tuple[str, list[float], str, float, float, bool]] = []
    rs, v = best("noop", c_hi, pa, ("floor-grpc", "-"))
    rows.append((f"noop gRPC c={c_hi} >= 1.0x the grpc.aio floor (milestone 0.75x)", rs, v, 1.0, 0.75, False))
    rs, v = best("noop", c_hi, pa, ("pytriton", "batch"))
    rows.append(
        (f"noop gRPC c={c_hi} >= 1.3x PyTriton with batching (milestone 1.0x)", rs, v, 1.3, 1.0, False)
    )
    for variant in ("nobatch", "batch"):
        rs = paired_ratios(doc, "noop", c_lo, pa, ("shoal", variant), ("floor-grpc", "-"), "p50_ms")
        what = f"noop gRPC c={c_lo} p50 <= 2.0x the floor's (milestone 2.5x)"
        rows.append((what, rs, variant, 2.0, 2.5, True))
    for proto, tool in (("gRPC", pa), ("HTTP", wrk)):
        rs = paired_ratios(doc, "sklearn", c_hi, tool, ("shoal", "batch"), ("pytriton", "batch"))
        what = f"sklearn {proto} c={c_hi} with batching >= 1.2x PyTriton with batching (milestone: ahead)"
        rows.append((what, rs, "batch", 1.2, 1.0 + 1e-9, False))
    rs, v = best("noop", c_hi, wrk, ("floor-http", "-"))
    rows.append(
        (f"noop HTTP c={c_hi} (wrk) >= 1.0x bare Starlette (milestone 0.75x)", rs, v, 1.0, 0.75, False)
    )
    for what, rs, variant, target, milestone, below in rows:
        if rs:
            verdict = _target(statistics.median(rs), target, milestone, below=below)
            interval = median_interval(rs)
            if interval is not None and interval[0] <= target <= interval[1]:
                # The verdict reads the median; with the target inside its interval another
                # run of the same code may well read the other way.
                verdict += " (the target is inside the median's 95% interval: this run cannot tell)"
            out.append(f"- {what}: shoal/{variant} {_ratio_text(rs)}: {verdict}")
    out += _ceiling_lines(doc, c_hi)
    return out


def _ceiling_lines(doc: dict[str, Any], c: int) -> list[str]:
    """What the noop c=``c`` target could reach on this machine: the grpc.aio floor run as
    shoal's ingress is (``floor-grpc-split``) against the floor, and shoal against that."""
    pa, split = "perf_analyzer grpc", ("floor-grpc-split", "-")
    rs = paired_ratios(doc, "noop", c, pa, split, ("floor-grpc", "-"))
    if not rs:
        return []
    out = [
        f"- (not a target) the ceiling of an ingress in as many processes as shoal's here: the bare "
        f"floor in that many processes sharing the port served {_ratio_text(rs)} the floor in one"
    ]
    for variant in ("nobatch", "batch"):
        mine = paired_ratios(doc, "noop", c, pa, ("shoal", variant), split)
        if mine:
            out.append(f"- (not a target) shoal/{variant} against that ceiling: {_ratio_text(mine)}")
    return out


def _paired_table(doc: dict[str, Any]) -> list[str]:
    """Median req/s (and p50) of each member of each paired cell, and the others' idle CPU."""
    cells: dict[tuple[str, int, str], dict[tuple[str, str], list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for p in doc.get("paired", []):
        if not p.get("failed"):
            cells[(p["workload"], p["concurrency"], label(p))][(p["system"], p["variant"])].append(p)
    lines = [
        "| workload | c | tool | system/variant | req/s (median) | p50 ms (median) "
        "| the others' CPU while idle |",
        "|---|---|---|---|---|---|---|",
    ]
    for (workload, c, tool), members in cells.items():
        for (sid, variant), ps in members.items():
            thr = statistics.median(p["throughput"] for p in ps)
            p50s = [p["p50_ms"] for p in ps if p.get("p50_ms") is not None]
            other = statistics.median(p.get("others_cpu", 0.0) for p in ps)
            lines.append(
                f"| {workload} | {c} | {tool} | {sid}/{variant} | {_num(thr)} · {len(ps)} windows | "
                f"{_num(statistics.median(p50s), '.2f') if p50s else '-'} | {other:.2f} cores |"
            )
    return lines


# ---------------------------------------------------------------- markdown


def _header(doc: dict[str, Any], rel: Path | str) -> list[str]:
    m, v, s = doc["machine"], doc["versions"], doc["settings"]
    conc = ", ".join(map(str, s["concurrency"]))
    vers = "; ".join(
        f"{name}: " + (", ".join(f"{k} {val}" for k, val in x.items()) if isinstance(x, dict) else str(x))
        for name, x in v.items()
        if x
    )
    lines = [
        "# Benchmarks",
        "",
        "shoal beside its peers on one machine, loaded by the same external tools. Generated by",
        f"`bench/run` from `{rel}`; regenerate with `make bench` (the whole suite) or",
        f"`bench/run --report {rel}` (this page only). How the suite works: `bench/README.md`.",
        "",
        f"- **Run**: {doc['started']} to {doc['finished']} ({doc['wall_s'] / 60:.1f} min), "
        f"command `{' '.join(doc['argv'])}`" + (" (a partial run)" if doc.get("partial") else ""),
        f"- **Machine**: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']}, "
        f"kernel {m['kernel']}, Python {m['python']}; load average {m['loadavg_start']} at the start, "
        f"{m.get('loadavg_end')} at the end (other work shares this machine: read ratios more than "
        "absolute numbers)",
        f"- **Settings**: {s['repeat']} rounds (A B A B: every system started, measured and stopped in "
        f"turn, then again), closed loop at concurrency {conc}; wrk, h2load and `shoal bench` "
        f"{s['duration_s']:g} s per point; perf_analyzer three 1 s windows",
        f"- **Versions**: {vers}",
    ]
    if doc.get("installs_s"):
        took = ", ".join(f"{k} {t:.0f} s" for k, t in doc["installs_s"].items())
        lines.append(f"- **Installs this run**: {took}")
    return [
        *lines,
        "",
        "Cells: median req/s over the rounds · p50 latency in ms (at the lowest concurrency) ·",
        "**median of the per-round ratios to the bare grpc.aio floor** loaded by the same tool",
        "(perf_analyzer and wrk rows against the floor's perf_analyzer gRPC numbers, h2load rows",
        "against its h2load numbers, `shoal bench` rows against its `shoal bench` gRPC numbers);",
        "HTTP rows also give the ratio to the bare Starlette floor (S).",
        "",
        "Other work shares this machine: between whole runs the same cell moved by up to 2x (see",
        "the load average above), ratios within a run by much less. Trust a ratio that holds across",
        "runs, and look at every point (the table at the end) before reading much into one cell.",
    ]


def _paired_section(doc: dict[str, Any]) -> list[str]:
    lines = paired_targets(doc)
    if not lines:
        return []
    n = doc["settings"].get("paired", 0)
    return [
        "### The same targets in paired windows",
        "",
        "The lines above compare rounds: each system was started, measured and stopped in turn, so",
        "the two sides of a ratio were measured minutes apart, and between rounds the same point",
        "moved by up to 2x here. Below, every system a target involves was up at once and the",
        f"points were taken in turn, {n} alternations (the order rotated each time): each ratio is",
        "the median of per-alternation ratios of points seconds apart, with its range and, from",
        "6 alternations on, an interval that holds the true median 95% of the time whatever the",
        "ratios' spread (the sign test's: for 12 alternations the 3rd to the 10th ratio). A",
        "target inside that interval is called undecided by the run, whichever side the median",
        "fell on. The last",
        "column of the table is the CPU the systems not being loaded used meanwhile: when it is",
        "larger for one system's windows than for another's (idle shoal, with its health checks",
        "and pings, uses more than the idle floors and PyTriton), that system ran beside more",
        "background load.",
        "",
        *lines,
        "",
        *_paired_table(doc),
        "",
    ]


def render(doc: dict[str, Any], path: Path) -> str:
    agg = aggregate(doc)
    here = path.resolve()
    rel = here.relative_to(systems.ROOT) if here.is_relative_to(systems.ROOT) else path
    lines = [
        *_header(doc, rel),
        "",
        "## Where shoal stands against its targets",
        "",
        *(targets(doc, agg) or ["- nothing to compare: shoal or the floor was not measured"]),
        "",
        *_paired_section(doc),
        "## gRPC",
        "",
        _table(doc, agg, GRPC_TOOLS, http=False),
        "",
        "## HTTP",
        "",
        _table(doc, agg, HTTP_TOOLS, http=True),
        "",
        "## Idle memory, one noop replica",
        "",
        "Peak over 2 s, after 3 s idle, of the summed RSS (and PSS, which counts shared pages once)",
        "of every process in the system's tree.",
        "",
        "| system | RSS MB | PSS MB | processes | start s |",
        "|---|---|---|---|---|",
    ]
    for mem in doc.get("memory", []):
        name = systems.SYSTEMS[mem["system"]].label if mem["system"] in systems.SYSTEMS else mem["system"]
        rss, pss = f"{mem['rss_mb']:,.0f}", f"{mem['pss_mb']:,.0f}"
        lines.append(f"| {name} | {rss} | {pss} | {mem['processes']} | {mem['start_s']} |")
    lines += [
        "",
        "## Load tool CPU",
        "",
        "The tools share the two cores with the server. Median CPU, in cores, of the tool and of the",
        "server's process tree over each point:",
        "",
        "| tool | tool CPU | server CPU |",
        "|---|---|---|",
    ]
    per_tool: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for p in doc["points"]:
        if not p.get("failed"):
            per_tool[label(p)].append((p["tool_cpu"], p["server_cpu"]))
    for tool, vals in sorted(per_tool.items()):
        t = statistics.median(x for x, _ in vals)
        sv = statistics.median(y for _, y in vals)
        lines.append(f"| {tool} | {t:.2f} | {sv:.2f} |")
    profile = Path(__file__).resolve().parent / "profile.md"
    if profile.exists():
        # Written by bench/cpu_profile.py (a separate run: it needs py-spy and a quiet machine).
        lines += ["", "## Where a request's CPU goes", "", profile.read_text().rstrip()]
    multiplex = Path(__file__).resolve().parent / "multiplex.md"
    if multiplex.exists():
        # Written by bench/multiplex.py --write (a separate run: its own cluster and models).
        lines += ["", "## Model multiplexing", "", multiplex.read_text().rstrip()]
    lines += ["", "## Not run, and why", ""]
    skipped = doc.get("skipped", {})
    failed = [p for p in doc["points"] if p.get("failed")]
    if not skipped and not failed:
        lines.append("- everything selected ran")
    for what, why in skipped.items():
        lines.append(f"- {what}: {why}")
    for p in failed:
        where = (
            f"round {p['round']} {p['system']}/{p['variant']} {p['workload']} {label(p)} c={p['concurrency']}"
        )
        lines.append(f"- {where}: {p['failed'][:300]}")
    for system, notes in doc.get("notes", {}).items():  # empty lists are left out
        lines += [f"- note, {system}: {note}" for note in notes]
    for place in doc.get("model_places", []):  # where each replica ran its model's calls
        lines.append(f"- round {place['round']}, {place['system']}, {place['line']}")
    lines += [
        "",
        "## Commands",
        "",
        "One point's command per system and tool (ports change per run; `post.lua` POSTs the V2 JSON",
        "body, `req.bin` is one length-prefixed serialized `ModelInferRequest`):",
        "",
        "```",
    ]
    seen = set()
    for p in doc["points"]:
        if (p["system"], label(p)) not in seen:
            seen.add((p["system"], label(p)))
            lines.append(f"# {p['system']}: {p['command']}")
    head = ["round", "system", "variant", "workload", "tool", "c", "req/s", "p50", "p90", "p99"]
    head += ["errors", "tool CPU", "server CPU"]
    lines += [
        "```",
        "",
        "<details><summary>Every point</summary>",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for p in doc["points"]:
        cells = [str(p["round"]), p["system"], p["variant"], p["workload"], label(p), str(p["concurrency"])]
        cells += [_num(p["throughput"])] + [_num(p[k], ".2f") for k in ("p50_ms", "p90_ms", "p99_ms")]
        cells += [f"{p['errors'] or ''}{' FAILED' if p.get('failed') else ''}"]
        cells += [f"{p['tool_cpu']:.2f}", f"{p['server_cpu']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "</details>", ""]
    return "\n".join(lines)
