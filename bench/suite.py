"""The side-by-side benchmark: shoal, its peers and two floors, on this machine, same load tools.

    bench/run                                   # everything: install peers, measure, write the table
    bench/run --only shoal,floor-grpc --workload noop
    bench/run --repeat 3 --duration 3           # longer, steadier
    bench/run --report bench/results/X.json     # render docs/benchmarks.md from a saved run

Order of work: install what is missing (peer virtualenvs under bench/.peers, perf_analyzer,
wrk and h2load), measure idle memory of a one-replica deployment of each system, then
``--repeat`` rounds; each round starts every system in turn, loads each of its models with
each tool that can drive it at each concurrency, and stops it, so that every comparison is
repeated A B A B on a noisy machine; then ``--paired`` alternations of the targets' paired
windows (:func:`paired_pass`: the systems a target compares up at once, points in turn).
Results go to ``bench/results/<time>.json``; a run with no filters (or ``--docs``) also
rewrites ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Container
from pathlib import Path
from typing import Any

import peers
import psutil
import report
import systems
import tools

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
ALL_TOOLS = ("pa-grpc", "pa-http", "h2load", "wrk", "bench-grpc", "bench-native")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- setup


def ensure_debian_tools() -> list[str]:
    """wrk and h2load from Debian; returns what is still missing."""
    missing = {"wrk": "wrk", "h2load": "nghttp2-client"}
    need = [pkg for exe, pkg in missing.items() if shutil.which(exe) is None]
    if need and os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {' '.join(need)} with apt-get")
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", *need], capture_output=True, timeout=600)
    return [exe for exe in missing if shutil.which(exe) is None]


def install_peers(selected: list[systems.System], want_pa: bool, skip: dict[str, str]) -> dict[str, float]:
    took: dict[str, float] = {}
    names = sorted({n for s in selected for n in s.needs})
    if want_pa:
        names.append("perf-analyzer")
    for name in names:
        if peers.installed(name):
            continue
        log(f"installing {name} (log: bench/.peers/{name}.log)")
        try:
            took[name] = round(peers.install(name, log=peers.PEERS / f"{name}.log"), 1)
            log(f"installed {name} in {took[name]:.0f}s")
        except (subprocess.CalledProcessError, SystemExit) as err:
            skip[name] = f"install failed: {err}"
            log(f"install of {name} FAILED: {err}")
    return took


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    os_name = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, Any]:
    from importlib.metadata import version

    out: dict[str, Any] = {
        "shoal": {
            n: version(n) for n in ("shoal", "grpcio", "protobuf", "starlette", "uvicorn", "scikit-learn")
        }
    }
    try:
        out["shoal"]["git"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        pass
    for name in ("mlserver", "pytriton", "ray", "perf-analyzer"):
        out[name] = peers.versions(name)
    for exe, flag in (("wrk", "-v"), ("h2load", "--version")):
        if shutil.which(exe):
            proc = subprocess.run([exe, flag], capture_output=True, text=True, timeout=10)
            out[exe] = (
                (proc.stdout + proc.stderr).strip().splitlines()[0] if (proc.stdout + proc.stderr) else "?"
            )
    return out


# ---------------------------------------------------------------- memory


def model_places(work: Path) -> list[str]:
    """What shoal's replicas logged about where their models' calls ran (the event loop or
    the model thread: ``shoal/backends/base.py``, INLINE_AFTER), so a run's figures can be
    read against it after the work folder is gone. Empty for other systems."""
    lines = []
    for path in sorted((work / "state" / "logs").glob("replica_*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "shoal.replica: model " in line and ("event loop" in line or "model thread" in line):
                lines.append(f"{path.stem}: {line.split('shoal.replica: ', 1)[1]}")
    return lines


def idle_memory(system: systems.System, work: Path) -> dict[str, Any]:
    """Start with one noop replica, let it settle, and take the peak of the tree's summed RSS."""
    run = system.start(work, only_noop=True)
    try:
        time.sleep(3.0)
        peak_rss = peak_pss = 0
        procs = 0
        for _ in range(8):
            rss = pss = 0
            pids = run.pids()
            for pid in pids:
                try:
                    info = psutil.Process(pid).memory_full_info()
                except psutil.Error:
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            if rss > peak_rss:
                peak_rss, procs = rss, len(pids)
            peak_pss = max(peak_pss, pss)
            time.sleep(0.25)
        return {
            "system": system.id,
            "rss_mb": round(peak_rss / 2**20, 1),
            "pss_mb": round(peak_pss / 2**20, 1),
            "processes": procs,
            "start_s": run.started_s,
        }
    finally:
        systems.stop(run)


# ---------------------------------------------------------------- load


def pa_shape(grpc_address: str, model: str, workload: tools.Workload) -> str | None:
    """perf_analyzer's --shape when the model's config leaves a dimension variable."""
    from shoal.errors import ShoalError
    from shoal.rpc.loadgen_client import grpc_model_config

    try:
        config = asyncio.run(grpc_model_config(grpc_address, model))
    except ShoalError:
        return None
    inp = next((i for i in config.get("input", []) if i.get("name") == workload.input_name), None)
    if inp is None:
        return None
    dims = [int(d) for d in inp.get("dims", [])]
    if -1 not in dims:
        return None
    row = workload.array.shape[1]
    full = [row] if int(config.get("max_batch_size", 0)) else [1, row]
    return f"{workload.input_name}:{','.join(map(str, full))}"


def pa_blocker(grpc_address: str, model: str) -> str:
    """Why perf_analyzer would abort on this server ('' when it would not).

    perf_analyzer reads ModelStatistics before and after each window and stops with "Server
    side statistics compute counts must be the same" unless compute_input, compute_infer and
    compute_output count the same executions. Call after at least one request.
    """
    from shoal.errors import ShoalError
    from shoal.rpc.loadgen_client import grpc_model_statistics

    try:
        doc = asyncio.run(grpc_model_statistics(grpc_address, model))
    except ShoalError:
        return ""
    for stats in doc.get("model_stats", []):
        infer = stats.get("inference_stats", {})
        counts = {
            k: int(infer.get(k, {}).get("count", 0))
            for k in ("compute_input", "compute_infer", "compute_output")
        }
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{k} {v}" for k, v in counts.items())
            return f"ModelStatistics compute counts differ ({listed}): perf_analyzer aborts on them"
    return ""


def probe_grpc(address: str, model: str, workload: tools.Workload) -> str | None:
    """One real gRPC ModelInfer (h2load cannot read grpc-status); None when it succeeded."""
    from shoal.rpc.loadgen_client import open_target

    async def go() -> str | None:
        target = open_target("grpc", address, model, {workload.input_name: workload.array}, timeout_s=10)
        try:
            return await target.probe()
        finally:
            await target.aclose()

    return asyncio.run(go())


def write_input(run: systems.Running, wname: str, workload: tools.Workload) -> Path:
    """The workload's input as ``shoal bench`` reads it (``--input``), in the run's folder."""
    path = run.work / f"{wname}.json"
    path.write_text(json.dumps({workload.input_name: workload.array.tolist()}))
    return path


def measure(
    run: systems.Running,
    args: argparse.Namespace,
    rnd: int,
    loads: dict[str, tools.Workload],
    skipped: dict[str, str],
) -> list[dict[str, Any]]:
    system = run.system
    points: list[dict[str, Any]] = []
    for variant, models in system.variants.items():
        for wname in args.workloads:
            workload, model = loads[wname], models[wname]
            input_file = write_input(run, wname, workload)
            for tool in system.tools:
                if tool not in args.tools:
                    continue
                if tool.startswith("pa-") or tool == "h2load":
                    if not tools.PERF_ANALYZER.exists() and tool.startswith("pa-"):
                        skipped[f"{system.id} {tool}"] = "perf_analyzer is not installed"
                        continue
                if tool in ("pa-grpc", "h2load") and not run.oip_grpc:
                    skipped[f"{system.id} {tool}"] = "no Open Inference Protocol gRPC ingress"
                    continue
                if tool == "pa-http" and not run.oip_http:
                    skipped[f"{system.id} {tool}"] = "no Open Inference Protocol HTTP ingress"
                    continue
                if tool == "wrk" and system.id == "shoal" and not run.oip_http:
                    skipped[f"{system.id} {tool}"] = "no Open Inference Protocol HTTP ingress"
                    continue
                if tool.startswith("pa-") and run.oip_grpc:
                    # A server whose statistics perf_analyzer rejects is loaded by h2load instead.
                    probe_grpc(run.grpc, model, workload)
                    blocker = pa_blocker(run.grpc, model)
                    if blocker:
                        skipped[f"{system.id} {tool}"] = blocker
                        if tool != "pa-grpc" or "h2load" not in args.tools or "h2load" in system.tools:
                            continue
                        tool = "h2load"
                        note = "h2load loads its OIP gRPC ingress instead of perf_analyzer (see above)"
                        if note not in run.notes:
                            run.notes.append(note)
                if tool == "h2load":
                    failed = probe_grpc(run.grpc, model, workload)
                    if failed:
                        skipped[f"{system.id} {variant} {model} h2load"] = f"gRPC probe failed: {failed}"
                        continue
                shape = pa_shape(run.grpc, model, workload) if tool.startswith("pa-") else None
                for c in args.concurrency:
                    if tool == "pa-http" and c != max(args.concurrency):
                        continue  # binary HTTP through perf_analyzer: the high-load point only
                    point = one_point(run, tool, model, workload, c, args.duration, shape, input_file)
                    row = {
                        "round": rnd,
                        "system": system.id,
                        "variant": variant,
                        "workload": wname,
                        "model": model,
                    }
                    row.update(point.as_dict())
                    points.append(row)
                    lat = f"p50 {point.p50_ms:.2f} ms" if point.p50_ms is not None else ""
                    log(
                        f"  r{rnd} {system.id}/{variant} {wname} {tool} c={c}: "
                        + (
                            f"FAILED {point.failed[:200]}"
                            if point.failed
                            else f"{point.throughput:,.0f} req/s {lat} errors {point.errors} "
                            f"tool CPU {point.tool_cpu:.0%} server CPU {point.server_cpu:.0%}"
                        )
                    )
    return points


def one_point(
    run: systems.Running,
    tool: str,
    model: str,
    workload: tools.Workload,
    c: int,
    duration: float,
    shape: str | None,
    input_file: Path,
) -> tools.Point:
    pids = run.pids
    if tool == "pa-grpc":
        return tools.perf_analyzer(run.grpc, model, "grpc", c, pids, shape=shape)
    if tool == "pa-http":
        return tools.perf_analyzer(run.http, model, "http", c, pids, shape=shape)
    if tool == "h2load":
        return tools.h2load(run.grpc, workload.grpc_frame(model), c, pids, duration_s=duration)
    if tool == "wrk":
        url = f"http://{run.http}/v2/models/{model}/infer"
        tools.wrk(url, workload.json_body(), min(c, 4), pids, duration_s=0.5)  # warm the path
        return tools.wrk(url, workload.json_body(), c, pids, duration_s=duration)
    if tool == "bench-grpc":
        return tools.shoal_bench(run.grpc, model, "grpc", c, pids, input_file=input_file, duration_s=duration)
    if tool == "bench-native":
        return tools.shoal_bench(
            run.grpc, model, "native", c, pids, input_file=input_file, duration_s=duration
        )
    raise ValueError(tool)


# ---------------------------------------------------------------- paired windows

# The comparisons behind the data-plane targets, measured once more with every system they
# involve up at the same time and their points taken in turn, window after window. Between
# two rounds (minutes apart) the same point moved by up to 2x on these shared machines, more
# than most of the differences the targets are about; points seconds apart share the
# machine's state. (workload, "hi" or "lo" concurrency, tool, (system, variant) members).
PAIRED_CELLS: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "noop",
        "hi",
        "pa-grpc",
        (
            ("floor-grpc", "-"),
            ("floor-grpc-split", "-"),
            ("shoal", "nobatch"),
            ("shoal", "batch"),
            ("pytriton", "batch"),
        ),
    ),
    ("noop", "lo", "pa-grpc", (("floor-grpc", "-"), ("shoal", "nobatch"), ("shoal", "batch"))),
    ("sklearn", "hi", "pa-grpc", (("floor-grpc", "-"), ("shoal", "batch"), ("pytriton", "batch"))),
    ("sklearn", "hi", "wrk", (("floor-http", "-"), ("shoal", "batch"), ("pytriton", "batch"))),
    ("noop", "hi", "wrk", (("floor-http", "-"), ("shoal", "nobatch"), ("shoal", "batch"))),
)


def paired_pass(
    runnable: list[systems.System],
    args: argparse.Namespace,
    loads: dict[str, tools.Workload],
    work_root: Path,
    skipped: dict[str, str],
) -> list[dict[str, Any]]:
    """``args.paired`` alternations of :data:`PAIRED_CELLS`, every system involved up at once.

    In alternation i each cell's members are loaded in turn, the order rotated by i so that
    none is always first. Each point also records the CPU the other systems (up, unloaded)
    used meanwhile. A member not selected, installed or up is left out of its cell; a cell
    left with one member is not measured.
    """
    hi, lo = max(args.concurrency), min(args.concurrency)
    ids = {s.id: s for s in runnable}

    def present(members: tuple[tuple[str, str], ...], up: Container[str]) -> tuple[tuple[str, str], ...]:
        return tuple(m for m in members if m[0] in up)

    cells = [
        (wname, level, tool, present(members, ids))
        for wname, level, tool, members in PAIRED_CELLS
        if wname in args.workloads
        and tool in args.tools
        and (tool != "pa-grpc" or tools.PERF_ANALYZER.exists())
    ]
    cells = [cell for cell in cells if len(cell[3]) > 1]
    if not cells or args.paired <= 0:
        return []
    running: dict[str, systems.Running] = {}
    points: list[dict[str, Any]] = []
    try:
        for sid in dict.fromkeys(m[0] for cell in cells for m in cell[3]):
            try:
                running[sid] = ids[sid].start(work_root / "paired" / sid)
            except RuntimeError as err:
                skipped[f"{sid} paired windows"] = str(err).splitlines()[0]
                log(f"  {sid}: did not start for the paired windows: {err}")
        cells = [(w, level, t, present(members, running)) for w, level, t, members in cells]
        cells = [cell for cell in cells if len(cell[3]) > 1]
        inputs: dict[tuple[str, str], tuple[Path, str | None]] = {}
        for wname, _, _tool, members in cells:
            for sid, variant in members:
                run = running[sid]
                model = run.system.variants[variant][wname]
                if (sid, model) in inputs:
                    continue
                workload = loads[wname]
                input_file = write_input(run, wname, workload)
                shape = None
                if run.oip_grpc and sid != "floor-http":
                    probe_grpc(run.grpc, model, workload)  # one request first (ModelStatistics)
                    shape = pa_shape(run.grpc, model, workload)
                inputs[(sid, model)] = (input_file, shape)
        for i in range(args.paired):
            log(f"paired windows, alternation {i + 1} of {args.paired}")
            for wname, level, tool, members in cells:
                c = hi if level == "hi" else lo
                turn = i % len(members)
                for sid, variant in members[turn:] + members[:turn]:
                    run = running[sid]
                    model = run.system.variants[variant][wname]
                    input_file, shape = inputs[(sid, model)]
                    others = [r for k, r in running.items() if k != sid]

                    def other_pids(others: list[systems.Running] = others) -> list[int]:
                        return [pid for r in others for pid in r.pids()]

                    before, t0 = tools.tree_cpu(other_pids), time.monotonic()
                    point = one_point(run, tool, model, loads[wname], c, args.duration, shape, input_file)
                    wall = time.monotonic() - t0
                    row: dict[str, Any] = {
                        "alternation": i + 1,
                        "system": sid,
                        "variant": variant,
                        "workload": wname,
                        "model": model,
                        "others_cpu": round((tools.tree_cpu(other_pids) - before) / wall, 3) if wall else 0.0,
                    }
                    row.update(point.as_dict())
                    points.append(row)
                    log(
                        f"  p{i + 1} {sid}/{variant} {wname} {tool} c={c}: "
                        + (
                            f"FAILED {point.failed[:200]}"
                            if point.failed
                            else f"{point.throughput:,.0f} req/s"
                            + (f" p50 {point.p50_ms:.2f} ms" if point.p50_ms is not None else "")
                            + f" (others idle at {row['others_cpu']:.0%} CPU)"
                        )
                    )
    finally:
        for run in running.values():
            systems.stop(run)
    return points


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n")[0])
    p.add_argument("--only", help=f"systems, comma-separated: {','.join(systems.SYSTEMS)}")
    p.add_argument("--skip", default="", help="systems to leave out")
    p.add_argument("--workload", default="noop,sklearn", help="noop,sklearn")
    p.add_argument("--concurrency", default="1,32", help="closed-loop concurrencies (default 1,32)")
    p.add_argument("--tools", default=",".join(ALL_TOOLS), help=f"load tools to use: {','.join(ALL_TOOLS)}")
    p.add_argument("--repeat", type=int, default=2, help="rounds over all systems (default 2: A B A B)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per wrk/h2load/shoal bench point")
    p.add_argument("--no-memory", action="store_true", help="skip the idle-memory pass")
    p.add_argument("--no-install", action="store_true", help="never install; skip what is missing")
    p.add_argument("--docs", action="store_true", help="rewrite docs/benchmarks.md even for a partial run")
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    p.add_argument("--report", metavar="RESULTS.json", help="only render docs/benchmarks.md from a saved run")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs of every server)")
    p.add_argument(
        "--paired",
        type=int,
        default=12,
        help="alternations of the targets' paired windows after the rounds (default 12; 0: none)",
    )
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workload.split(",") if w]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.tools = [t for t in args.tools.split(",") if t]
    names = args.only.split(",") if args.only else list(systems.SYSTEMS)
    unknown = [n for n in names + [s for s in args.skip.split(",") if s] if n not in systems.SYSTEMS]
    if unknown or any(w not in systems.WORKLOADS for w in args.workloads):
        p.error(f"unknown system or workload: {unknown or args.workloads}")
    args.systems = [systems.SYSTEMS[n] for n in names if n not in args.skip.split(",")]
    args.partial = bool(
        args.only or args.skip or args.workload != "noop,sklearn" or args.concurrency != [1, 32]
    )
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's info lines would interleave the log
    if args.report:
        doc = json.loads(Path(args.report).read_text())
        if args.no_docs:  # only the summary table of the saved run
            print(report.summary(doc))
            return 0
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        DOCS.write_text(report.render(doc, Path(args.report)))
        log(f"wrote {DOCS}")
        return 0

    t0 = time.monotonic()
    started = dt.datetime.now(dt.UTC)
    skipped: dict[str, str] = {}
    installs: dict[str, float] = {}
    if not args.no_install:
        missing = ensure_debian_tools()
        want_pa = any(t.startswith("pa-") for t in args.tools)
        installs = install_peers(args.systems, want_pa, skipped)
    else:
        missing = [exe for exe in ("wrk", "h2load") if shutil.which(exe) is None]
    for exe in missing:
        skipped[exe] = "not installed"
    args.tools = [
        t
        for t in args.tools
        if not ((t == "wrk" and "wrk" in missing) or (t == "h2load" and "h2load" in missing))
    ]
    runnable = []
    for s in args.systems:
        absent = [n for n in s.needs if not peers.installed(n)]
        if absent:
            skipped[s.id] = f"not installed: {', '.join(absent)}"
        else:
            runnable.append(s)
    loads = tools.workloads()
    work_root = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    doc: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "argv": ["bench/run", *argv],
        "machine": machine(),
        "versions": versions(),
        "installs_s": installs,
        "settings": {
            "repeat": args.repeat,
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "workloads": args.workloads,
            "tools": args.tools,
            "paired": args.paired,
        },
        "memory": [],
        "points": [],
        "paired": [],
        "starts": [],
        "skipped": skipped,
        "notes": {},
        "model_places": [],
        "partial": args.partial,
    }
    log(f"machine: {doc['machine']}")
    log(f"work folder: {work_root}")
    try:
        if not args.no_memory:
            log("idle memory, one noop replica each")
            for s in runnable:
                try:
                    m = idle_memory(s, work_root / "memory" / s.id)
                    doc["memory"].append(m)
                    log(
                        f"  {s.id}: {m['rss_mb']:.0f} MB RSS ({m['pss_mb']:.0f} MB PSS), "
                        f"{m['processes']} processes"
                    )
                except RuntimeError as err:
                    skipped[f"{s.id} memory"] = str(err).splitlines()[0]
                    log(f"  {s.id}: FAILED {err}")
        for rnd in range(1, args.repeat + 1):
            log(f"round {rnd} of {args.repeat}")
            for s in runnable:
                work = work_root / f"r{rnd}" / s.id
                try:
                    run = s.start(work)
                except RuntimeError as err:
                    skipped[f"{s.id} round {rnd}"] = str(err).splitlines()[0]
                    log(f"  {s.id}: did not start: {err}")
                    continue
                log(f"  {s.id} up in {run.started_s:.1f}s ({len(run.pids())} processes)")
                doc["starts"].append({"round": rnd, "system": s.id, "start_s": run.started_s})
                doc["notes"][s.id] = run.notes  # measure() may add to them
                try:
                    doc["points"] += measure(run, args, rnd, loads, skipped)
                finally:
                    systems.stop(run)
                    for line in model_places(run.work):
                        doc["model_places"].append({"round": rnd, "system": s.id, "line": line})
        doc["paired"] = paired_pass(runnable, args, loads, work_root, skipped)
    finally:
        doc["wall_s"] = round(time.monotonic() - t0, 1)
        doc["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        doc["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{started.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(doc, indent=1))
        log(f"wrote {out} ({doc['wall_s']:.0f}s in all)")
        if not args.keep:
            shutil.rmtree(work_root, ignore_errors=True)
    print(report.summary(doc))
    if not args.no_docs and (args.docs or not args.partial):
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        DOCS.write_text(report.render(doc, out))
        log(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
