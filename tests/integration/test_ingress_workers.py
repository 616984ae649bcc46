"""Ingress on every core: a scheduler whose inference ports are served by two processes.

The scheduler's main process and one ingress worker share the gRPC and HTTP ports
(SO_REUSEPORT). Killing the worker under load costs no request of a client that retries a
broken connection, and the worker comes back; limits hold in total; counts are summed
whichever process answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest
import pytest_asyncio

from shoal.cli.processes import log_file
from shoal.core import reuseport
from shoal.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]

TENSORS = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
DELAY_S = 0.3
QUEUE = 4


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, examples_dir: Path
) -> AsyncIterator[ProcessCluster]:
    env = {"SHOAL_INGRESS_WORKERS": "2"}
    async with ProcessCluster(tmp_path_factory.mktemp("ingress"), env=env) as c:
        base = {"backend": "python", "model": "echo:Echo", "base_dir": str(examples_dir)}
        await c.deploy(
            {"name": "echo", **base, "resources": {"cpus": 0.1}, "inputs": TENSORS, "outputs": TENSORS}
        )
        await c.deploy(
            {
                "name": "slow",
                **base,
                "options": {"delay_ms": DELAY_S * 1000},
                "resources": {"cpus": 0.1},
                "max_ongoing_requests": 1,
                "max_queued_requests": QUEUE,
                "inputs": TENSORS,
                "outputs": TENSORS,
            }
        )
        await c.wait_ready("echo", 1)
        await c.wait_ready("slow", 1)
        yield c


def workers(cluster: ProcessCluster) -> list[psutil.Process]:
    """The scheduler's ingress worker processes. A worker just killed is a zombie until it is
    reaped, and psutil raises ZombieProcess for its command line (seen in a make test run of
    test_a_stopped_ingress_worker_is_killed_and_started_again): it is not counted."""
    main = psutil.Process(cluster.schedulers[0].pid)
    found = []
    for p in main.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "shoal.ingress_worker" in " ".join(p.cmdline()):
                found.append(p)
    return found


def listeners(pid: int) -> set[int]:
    return {
        c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN
    }


async def wait_for(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def counted_ok(text: str, deployment: str) -> float:
    key = f'shoal_requests_total{{deployment="{deployment}",outcome="ok"}} '
    line = next((ln for ln in text.splitlines() if ln.startswith(key)), None)
    return float(line.split()[-1]) if line else 0.0


async def test_both_processes_listen_on_both_ports_and_counts_are_summed(cluster: ProcessCluster) -> None:
    await wait_for(lambda: len(workers(cluster)) == 1, 10, "the ingress worker process")
    [worker] = workers(cluster)
    grpc_port = int(cluster.scheduler_address().rsplit(":", 1)[1])
    http_port = int(cluster.http_address().rsplit(":", 1)[1])
    # A worker listens once it has started (about 2 s on a loaded machine), not at spawn.
    await wait_for(lambda: {grpc_port, http_port} <= listeners(worker.pid), 20, "the worker to listen")
    assert {grpc_port, http_port} <= listeners(cluster.schedulers[0].pid)

    url = f"http://{cluster.http_address()}"
    for _ in range(30):
        # A new connection each time: the kernel spreads them over both processes.
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            r = await http.post("/v2/models/echo/infer", json=BODY)
            assert r.status_code == 200, r.text

    async def summed() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            return counted_ok((await http.get("/metrics")).text, "echo")

    # Every process's /metrics shows the sum (a worker's report is at most 0.5 s old).
    deadline = time.monotonic() + 5
    seen = [await summed() for _ in range(6)]
    while any(s != 30 for s in seen) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        seen = [await summed() for _ in range(6)]
    assert seen == [30.0] * 6


def owners(pids: list[int], port: int, clients: list[socket.socket]) -> list[int]:
    """Which of ``pids`` holds each client connection's server end on ``port`` (-1: none yet)."""
    held = {}
    for pid in pids:
        for c in psutil.Process(pid).net_connections("tcp"):
            if c.laddr.port == port and c.raddr:
                held[c.raddr.port] = pid
    return [held.get(c.getsockname()[1], -1) for c in clients]


def reuseport_allowed() -> str | None:
    """None where this process may load eBPF, and so the scheduler (same user, same
    machine); else why not."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind(("127.0.0.1", 0))
        probe.listen(1)
        return reuseport.deal_in_turn(probe, 2)


async def test_new_connections_go_to_the_processes_in_turn(cluster: ProcessCluster) -> None:
    why = reuseport_allowed()
    said = cluster.schedulers[0].log.read_text(errors="replace")
    if why is not None:
        # The scheduler says so, and why, in its log.
        assert "connections reach the 2 ingress processes by the kernel's hash: " in said
        pytest.skip(f"the kernel's hash spreads connections here: {why}")
    assert "new connections go to the 2 ingress processes in turn" in said
    await wait_for(lambda: len(workers(cluster)) == 1, 10, "the ingress worker process")
    [worker] = workers(cluster)
    for address in (cluster.scheduler_address(), cluster.http_address()):
        await dealt_evenly(address, [cluster.schedulers[0].pid, worker.pid])


async def dealt_evenly(address: str, pids: list[int]) -> None:
    host, port = address.rsplit(":", 1)
    await wait_for(lambda: int(port) in listeners(pids[1]), 20, "the worker to listen")
    # Six connections, as perf_analyzer opens at c=32: by the addresses' hash they fell 3/3
    # in 6 of 20 tries (bench/ingress_split.py); in turn they are always 3/3.
    clients = [socket.create_connection((host, int(port)), timeout=5) for _ in range(6)]
    try:
        await wait_for(lambda: -1 not in owners(pids, int(port), clients), 10, "the accepts")
        held = owners(pids, int(port), clients)
        assert sorted(held.count(pid) for pid in pids) == [3, 3], (address, held)
    finally:
        for c in clients:
            c.close()


async def test_max_queued_requests_holds_in_total(cluster: ProcessCluster) -> None:
    flood = 40
    limits = httpx.Limits(max_connections=flood)
    async with httpx.AsyncClient(
        base_url=f"http://{cluster.http_address()}", timeout=30, limits=limits
    ) as http:

        async def one() -> int:
            return (await http.post("/v2/models/slow/infer", json=BODY)).status_code

        codes = await asyncio.gather(*(one() for _ in range(flood)))
    admitted = codes.count(200)
    assert set(codes) <= {200, 503}, codes
    # Each of the 2 processes takes half the queue (2) and one request in flight: at most
    # QUEUE + 2 running or waiting at once; a slot that frees meanwhile may let one more in.
    assert QUEUE <= admitted <= QUEUE + 2 + 2, codes


async def test_killing_an_ingress_worker_under_load_loses_no_request(cluster: ProcessCluster) -> None:
    [worker] = workers(cluster)
    url = f"http://{cluster.http_address()}"
    failed: list[str] = []
    ok = 0
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal ok
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            while not stop.is_set():
                for _attempt in range(5):
                    try:
                        r = await http.post("/v2/models/echo/infer", json=BODY)
                    except httpx.TransportError:
                        continue  # the connection died with its process: a retrying client retries
                    if r.status_code == 200:
                        ok += 1
                    else:
                        failed.append(f"{r.status_code} {r.text}")
                    break
                else:
                    failed.append("no answer after 5 attempts")

    clients = [asyncio.create_task(client()) for _ in range(8)]
    await wait_for(lambda: ok >= 20, 15, "answers before the kill")
    before = ok
    os.kill(worker.pid, signal.SIGKILL)
    # Answers go on: the clients retry on new connections.
    await wait_for(lambda: ok >= before + 50, 15, "answers after the kill")
    stop.set()
    await asyncio.gather(*clients)
    assert failed == []

    # The worker is started again and listens on the ports.
    await wait_for(lambda: [w.pid for w in workers(cluster)] not in ([], [worker.pid]), 15, "a new worker")
    [again] = workers(cluster)
    http_port = int(cluster.http_address().rsplit(":", 1)[1])
    await wait_for(lambda: http_port in listeners(again.pid), 15, "the new worker to listen")
    # The group kept its rule through the worker's death: the new one takes its turns.
    if reuseport_allowed() is None:
        await dealt_evenly(cluster.scheduler_address(), [cluster.schedulers[0].pid, again.pid])


async def test_a_stopped_ingress_worker_is_killed_and_started_again(cluster: ProcessCluster) -> None:
    """A worker that runs but does not answer (SIGSTOP: its sockets stay open, and the kernel
    still gives it its share of new connections) is killed after IngressWorkers.SILENT_AFTER_S
    without a report, and started again. Before, it was left stopped: 3-5 of every 10 new
    connections hung for as long as it stayed so."""
    await wait_for(lambda: len(workers(cluster)) == 1, 15, "the ingress worker process")
    [worker] = workers(cluster)
    http_port = int(cluster.http_address().rsplit(":", 1)[1])
    await wait_for(lambda: http_port in listeners(worker.pid), 20, "the worker to listen")
    await asyncio.sleep(1.0)  # it has reported (every 0.5 s)

    def gone() -> bool:
        try:
            return worker.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    os.kill(worker.pid, signal.SIGSTOP)
    try:
        await wait_for(gone, 60, "the stopped worker to be killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGCONT)
    await wait_for(lambda: [w.pid for w in workers(cluster)] not in ([], [worker.pid]), 15, "a new worker")
    [again] = workers(cluster)
    await wait_for(lambda: http_port in listeners(again.pid), 20, "the new worker to listen")
    url = f"http://{cluster.http_address()}"
    for _ in range(10):
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:  # a new connection each
            r = await http.post("/v2/models/echo/infer", json=BODY)
            assert r.status_code == 200, r.text


async def test_an_ingress_workers_lines_are_in_the_log_file_too(cluster: ProcessCluster) -> None:
    """What an ingress worker logs reaches its scheduler's log file (``<state>/logs/scheduler.log``;
    ``up.log`` under ``shoal up``), which ``shoal logs scheduler`` reads, as well as stderr.
    Before, a worker's lines reached stderr only: the file lacked every refusal a worker served."""
    await wait_for(lambda: len(workers(cluster)) == 1, 15, "the ingress worker process")
    [worker] = workers(cluster)
    http_port = int(cluster.http_address().rsplit(":", 1)[1])
    await wait_for(lambda: http_port in listeners(worker.pid), 20, "the worker to listen")
    scheduler = cluster.schedulers[0]
    stderr, file = scheduler.log, log_file(scheduler.state, "scheduler")
    marker = f"probe{secrets.token_hex(4)}"
    bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [marker, 2, 3, 4]}]}
    for _ in range(10):
        # A new connection each time: both processes serve some (at most 10 refusals a second
        # are logged by each).
        async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}", timeout=10) as http:
            r = await http.post("/v2/models/echo/infer", json=bad)
            assert r.status_code == 400, r.text

    def marked(path: Path) -> list[str]:
        return [ln for ln in path.read_text(errors="replace").splitlines() if marker in ln]

    # The worker's lines on stderr carry its tag ("ingress"); the main process's do not.
    await wait_for(lambda: len(marked(stderr)) == 10, 10, "the 10 refusals on stderr")
    assert any(" ingress " in ln for ln in marked(stderr)), marked(stderr)
    deadline = time.monotonic() + 10
    while sorted(marked(file)) != sorted(marked(stderr)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert sorted(marked(file)) == sorted(marked(stderr))


def thread_cpus(pid: int) -> set[frozenset[int]]:
    """The CPU sets the threads of process ``pid`` may run on (one entry per distinct set)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add(frozenset(os.sched_getaffinity(int(tid))))
        except (ProcessLookupError, FileNotFoundError):
            continue  # a thread that ended meanwhile
    return out


async def test_each_ingress_process_runs_on_a_cpu_of_its_own_and_replicas_loops_one_each(
    cluster: ProcessCluster,
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU: two ingress processes are not pinned")
    # Whichever worker is there now (after the test above killed one, its successor).
    await wait_for(lambda: len(workers(cluster)) == 1, 15, "the ingress worker process")
    [worker] = workers(cluster)
    main = cluster.schedulers[0].pid
    await wait_for(lambda: len(thread_cpus(worker.pid)) == 1, 15, "the worker's threads on one CPU")
    assert thread_cpus(main) == {frozenset({cpus[0]})}
    assert thread_cpus(worker.pid) == {frozenset({cpus[1]})}
    children = psutil.Process(main).children(recursive=True)
    replicas = [p for p in children if "shoal.replica_main" in " ".join(p.cmdline())]
    zygotes = [p for p in children if "zygote" in " ".join(p.cmdline())]
    assert len(replicas) == 2 and len(zygotes) == 1
    assert thread_cpus(zygotes[0].pid) == {frozenset(cpus)}

    # Each replica's event-loop thread (the first: its id is the pid) on an ingress CPU, one
    # replica each (replica_pin_loop); every other thread of theirs on every CPU.
    def loop_cpus() -> list[set[int]]:
        return [os.sched_getaffinity(p.pid) for p in replicas]

    await wait_for(lambda: all(len(c) == 1 for c in loop_cpus()), 15, "the replicas' loops pinned")
    assert sorted(min(c) for c in loop_cpus()) == cpus[:2]
    said = cluster.schedulers[0].log.read_text(errors="replace")
    assert (
        sorted(
            int(ln.split(" on CPU ")[1].split()[0])
            for ln in said.splitlines()
            if "runs its event loop on CPU" in ln and " now " not in ln
        )
        == cpus[:2]
    )
    for replica in replicas:
        others = set()
        for tid in os.listdir(f"/proc/{replica.pid}/task"):
            if int(tid) != replica.pid:
                with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                    others.add(frozenset(os.sched_getaffinity(int(tid))))
        assert others == {frozenset(cpus)}, (replica.pid, others)


SPIN = """
import threading, time
from pathlib import Path

class Spin:
    \"\"\"Threads of its own that compute until a file appears (at most a minute), as a
    model's background work (a prefetcher, a BLAS pool) may. They begin once all are
    started, and look for the file four times a second: a thread that lets the GIL go for a
    system call takes it straight back, before a waiting thread wakes, so two threads
    spinning around a stat each few milliseconds kept it from every other thread of the
    replica (Thread.start waits for the new thread to take it: the replica loaded only
    when the file appeared, 30 s on, in 3 of 5 runs of this module).\"\"\"

    def __init__(self, stop: str, threads: int = 3) -> None:
        go = threading.Event()

        def spin() -> None:
            go.wait()
            end = time.monotonic() + 60
            look = 0.0
            while (now := time.monotonic()) < end:
                if now >= look:
                    if Path(stop).exists():
                        return
                    look = now + 0.25
                for _ in range(100_000):
                    pass
        for _ in range(threads):
            threading.Thread(target=spin, daemon=True).start()
        go.set()

    def predict(self, inputs):
        return dict(inputs)
"""


async def test_while_a_models_threads_keep_cpus_busy_every_loop_runs_free(
    cluster: ProcessCluster, tmp_path: Path
) -> None:
    """A pinned loop cannot leave a CPU a model's thread computes on: while replicas' other
    threads use over half a CPU, every loop runs free, and the scheduler says so."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU: two ingress processes are not pinned")
    (tmp_path / "spin.py").write_text(SPIN)
    stop = tmp_path / "stop"
    log = cluster.schedulers[0].log
    await cluster.deploy(
        {
            "name": "spin",
            "backend": "python",
            "model": "spin:Spin",
            "base_dir": str(tmp_path),
            "options": {"stop": str(stop)},
            "resources": {"cpus": 0.1},
            "inputs": TENSORS,
            "outputs": TENSORS,
        }
    )
    try:
        await cluster.wait_ready("spin", 1)
        main = psutil.Process(cluster.schedulers[0].pid)
        replicas = [p for p in main.children(recursive=True) if "shoal.replica_main" in " ".join(p.cmdline())]
        assert len(replicas) == 3
        busy = "replicas' models keep CPUs busy: their event loops run free (replica_pin_loop)"
        await wait_for(lambda: busy in log.read_text(errors="replace"), 30, "the models-busy line")
        await wait_for(
            lambda: all(os.sched_getaffinity(p.pid) == set(cpus) for p in replicas), 10, "every loop free"
        )
    finally:
        stop.touch()
    quiet = "replicas' models are quiet again (replica_pin_loop)"
    await wait_for(lambda: quiet in log.read_text(errors="replace"), 30, "the quiet-again line")
    # Pinned again, one loop per ingress CPU.
    await wait_for(
        lambda: sorted(min(c) for r in replicas if len(c := os.sched_getaffinity(r.pid)) == 1) == cpus[:2],
        15,
        "two loops pinned again",
    )


async def test_a_worker_goes_on_serving_through_ctrl_c(cluster: ProcessCluster) -> None:
    """Ctrl-C in a terminal sends SIGINT to every process of the group; the scheduler
    decides when its workers stop (after its replicas drained). Before, a worker stopped
    at once and was started again."""
    await wait_for(lambda: len(workers(cluster)) == 1, 10, "the ingress worker process")
    [worker] = workers(cluster)
    http_port = int(cluster.http_address().rsplit(":", 1)[1])
    await wait_for(lambda: http_port in listeners(worker.pid), 20, "the worker to listen")
    worker.send_signal(signal.SIGINT)
    await asyncio.sleep(1.0)  # a worker that took it would be gone by now (it exits within 0.2 s)
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    assert [p.pid for p in workers(cluster)] == [worker.pid]
    assert http_port in listeners(worker.pid)
