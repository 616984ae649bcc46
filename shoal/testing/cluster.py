"""A real cluster for tests: ``shoal head`` and ``shoal scheduler`` as separate
processes on port 0, each with its own state folder, and helpers to drive,
observe and break it. Every process it starts (replicas included) is killed
by ``close()``.

    async with ProcessCluster(tmp_path, schedulers=2) as cluster:
        await cluster.deploy(spec)
        await cluster.wait_ready("echo", 2)
        outputs, replica = await cluster.send("echo", {"x": x})
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import psutil

from shoal.config import Settings
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.rpc.clients import ControlClient, send_request
from shoal.types import Arrays

#: Short intervals so failures are noticed in tests within a second or two.
FAST = {
    "SHOAL_HEARTBEAT_INTERVAL_S": "0.2",
    "SHOAL_DEAD_AFTER_S": "2",
    "SHOAL_RECONCILE_INTERVAL_S": "0.2",
    "SHOAL_REPLICA_HEALTH_INTERVAL_S": "0.2",
    "SHOAL_ORPHAN_AFTER_S": "2",
    "SHOAL_PING_INTERVAL_S": "0.2",
    "SHOAL_SHUTDOWN_GRACE_S": "3",
    "SHOAL_RPC_TIMEOUT_S": "2",
    # One ingress process per scheduler unless a test asks for more (tests of the workers do).
    "SHOAL_INGRESS_WORKERS": "1",
}


def _wait_file(
    path: Path, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0
) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            try:
                doc: dict[str, str] = json.loads(path.read_text())
                return doc
            except ValueError:
                pass
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear in {timeout_s}s:\n{log.read_text()[-3000:]}")


class Component:
    """One shoal process (head or scheduler) and its state folder."""

    def __init__(self, name: str, args: list[str], state: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.args = args
        self.state = state
        self.env = dict(env)
        self.log = state / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoints: dict[str, str] = {}
        self._known_children: set[int] = set()

    def start(self, keys: tuple[str, ...]) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        ep = self.state / "endpoints.json"
        if ep.exists():
            ep.unlink()
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", *self.args, "--state", str(self.state)],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        out.close()
        self._wait_started(keys)

    def _wait_started(self, keys: tuple[str, ...]) -> None:
        """Wait until the started process writes ``keys`` to its endpoints.json; when it does
        not (a slow machine, a crash), kill it: nothing of it may outlive the test."""
        assert self.proc is not None
        ep = self.state / "endpoints.json"
        deadline = time.monotonic() + 30
        try:
            while True:
                doc = _wait_file(ep, self.proc, self.log)
                if all(k in doc for k in keys):
                    self.endpoints = doc
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} did not report {keys}")
                time.sleep(0.05)
        except BaseException:
            self.kill_all()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> set[int]:
        """Pids of processes it started (replicas), remembered even after it dies."""
        if self.alive():
            try:
                for child in psutil.Process(self.pid).children(recursive=True):
                    self._known_children.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        return {p for p in self._known_children if psutil.pid_exists(p) and _not_zombie(p)}

    def signal(self, sig: int) -> None:
        self.children()
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def kill_all(self) -> None:
        kids = self.children()
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _is_replica(pid: int) -> bool:
    try:
        return "shoal.replica_main" in psutil.Process(pid).cmdline()
    except psutil.Error:
        return False


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ProcessCluster:
    def __init__(
        self,
        root: Path,
        *,
        schedulers: int = 1,
        env: Mapping[str, str] | None = None,
        scheduler_args: list[list[str]] | None = None,
    ) -> None:
        self.root = root
        self.env = {**os.environ, **FAST, **(env or {})}
        self.env.pop("SHOAL_HEAD", None)
        self.n_schedulers = schedulers
        self.scheduler_args = scheduler_args or [[] for _ in range(schedulers)]
        self.head: Component | None = None
        self.schedulers: list[Component] = []
        self.settings = Settings.load(env={})
        self._client: ControlClient | None = None
        self._pids_seen: set[int] = set()
        self._routing: set[str] = set()  # schedulers seen ready (by HTTP address): _until_routing

    async def __aenter__(self) -> ProcessCluster:
        try:
            await asyncio.to_thread(self.start)
        except BaseException:
            await self.close()  # the head (and schedulers) that did start: no process left over
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ processes

    def start(self) -> None:
        self.head = Component(
            "head", ["head", "--port", "0", "--http-port", "0"], self.root / "head", self.env
        )
        self.head.start(("head", "head_http"))
        for i in range(self.n_schedulers):
            self.add_scheduler(self.scheduler_args[i] if i < len(self.scheduler_args) else [])

    def add_scheduler(self, extra: list[str] | None = None) -> Component:
        i = len(self.schedulers)
        comp = Component(
            f"scheduler{i}",
            [
                "--head",
                self.head_address,
                "scheduler",
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                *(extra or []),
            ],
            self.root / f"scheduler{i}",
            self.env,
        )
        comp.start(("scheduler", "scheduler_http"))
        self.schedulers.append(comp)
        return comp

    def restart_head(self) -> None:
        """Start the head again on the same ports and state folder (after it was killed)."""
        assert self.head is not None
        port = self.head.endpoints["head"].rsplit(":", 1)[1]
        http = self.head.endpoints["head_http"].rsplit(":", 1)[1]
        self.head.args = ["head", "--port", port, "--http-port", http]
        self.head.start(("head", "head_http"))

    @property
    def head_address(self) -> str:
        assert self.head is not None
        return self.head.endpoints["head"]

    def scheduler_address(self, i: int = 0) -> str:
        return self.schedulers[i].endpoints["scheduler"]

    def http_address(self, i: int = 0) -> str:
        return self.schedulers[i].endpoints["scheduler_http"]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        comps = [*self.schedulers, *([self.head] if self.head else [])]
        for comp in comps:
            comp.signal(signal.SIGTERM)
        for comp in comps:
            if comp.proc is not None:
                try:
                    await asyncio.to_thread(comp.wait, 15)
                except subprocess.TimeoutExpired:
                    pass
            comp.kill_all()
        for pid in self._pids_seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftover_replicas(self) -> list[int]:
        """Replica processes this cluster ever started that are still running (not a
        scheduler's zygote or ingress workers: ``shoal.zygote``)."""
        return sorted(
            p
            for p in self._pids_seen | self._all_children()
            if psutil.pid_exists(p) and _not_zombie(p) and _is_replica(p)
        )

    def _all_children(self) -> set[int]:
        out: set[int] = set()
        for comp in self.schedulers:
            out |= comp.children()
        return out

    # ------------------------------------------------------------ control

    @property
    def client(self) -> ControlClient:
        if self._client is None:
            self._client = ControlClient(self.head_address, self.settings)
        return self._client

    async def reconnect(self) -> None:
        """Drop the control channel (e.g. after restarting the head); the next call opens a new one."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def deploy(self, spec: DeploymentSpec | dict[str, Any]) -> None:
        if isinstance(spec, dict):
            spec = parse_spec(spec)
        await self.client.apply(spec)

    async def status(self) -> dict[str, Any]:
        status = (await self.client.status()).to_json()
        for dep in status["deployments"]:
            for r in dep["replicas"]:
                if r["pid"]:
                    self._pids_seen.add(r["pid"])
        self._all_children()
        return status

    async def replicas(self, deployment: str) -> list[dict[str, Any]]:
        for dep in (await self.status())["deployments"]:
            if dep["name"] == deployment:
                return list(dep["replicas"])
        return []

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0, what: str = "condition"
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                status = await self.status()
            except Exception:
                status = {}
            if status and predicate(status):
                return status
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{what} not reached in {timeout_s}s; last status: {json.dumps(status)[:3000]}")

    async def wait_ready(self, deployment: str, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        def ok(status: dict[str, Any]) -> bool:
            for dep in status["deployments"]:
                if dep["name"] == deployment:
                    ready = [r for r in dep["replicas"] if r["state"] == "READY"]
                    return len(ready) == count and len(dep["replicas"]) == count
            return False

        status = await self.wait_for(ok, timeout_s, f"{deployment} with {count} READY replicas")
        dep = next(d for d in status["deployments"] if d["name"] == deployment)
        return list(dep["replicas"])

    async def send(
        self, deployment: str, inputs: Arrays, *, scheduler: int = 0, timeout_s: float = 0.0
    ) -> tuple[Arrays, str]:
        await self._until_routing(scheduler)
        return await send_request(
            self.scheduler_address(scheduler), deployment, inputs, self.settings, timeout_s=timeout_s
        )

    async def _until_routing(self, i: int, timeout_s: float = 30.0) -> None:
        """Until scheduler ``i`` is ready (``/v2/health/ready``: registered, with its first
        routing table), once per scheduler. A request sent before its first table is refused
        UNAVAILABLE ('not known here yet'), and a scheduler starts once its ports listen,
        before it has registered: a test that deploys and sends at once met that (a request
        refused, seen under load in test_autoscale.py). Gives up quietly after ``timeout_s``:
        the request then gets whatever the scheduler answers."""
        address = self.http_address(i)
        if address in self._routing or self.settings.tls_dir:  # (with TLS: not looked at)
            return
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                try:
                    if (await http.get(f"http://{address}/v2/health/ready")).status_code == 200:
                        self._routing.add(address)
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
