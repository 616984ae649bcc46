"""Real etcd processes on loopback for tests: one member or a small cluster, each with its
own temporary data folder and free ports, stopped (and waited for) on :meth:`EtcdCluster.stop`;
and :class:`EtcdHeads`, shoal heads on such a cluster.

Tests never use etcd's default ports (2379/2380): ports are picked free by the kernel.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.config import Settings
from shoal.rpc.clients import ControlClient
from shoal.testing.cluster import FAST, Component

ETCD = "/usr/bin/etcd"


def etcd_binary() -> str | None:
    """The etcd binary, or ``None`` when it is not installed (``make system-deps`` installs it)."""
    return shutil.which("etcd") or (ETCD if os.path.exists(ETCD) else None)


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free right now (closed again: a small race, fine for tests)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    address: str = "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.client_port}"


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1. ``start()`` returns once every member is healthy.

    Election settings are short (heartbeat 50 ms, election 500 ms) so a lost member is
    noticed quickly in tests.
    """

    def __init__(
        self,
        folder: Path,
        size: int = 1,
        *,
        tls_dir: Path | None = None,
        address: str = "127.0.0.1",
        launch: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
    ) -> None:
        """``tls_dir``: a folder made by ``shoal certs init``; the members then serve clients
        over TLS with ``head.crt`` and require a certificate of the same CA from them.
        ``address`` and ``launch``: where the members listen and what starts them (a test
        host's ``popen``, to run them in its network namespace)."""
        self.tls_dir = tls_dir
        self.address = address
        self._launch = launch
        binary = etcd_binary()
        if binary is None:
            raise FileNotFoundError("etcd is not installed (make system-deps installs etcd-server)")
        self.binary = binary
        self.folder = folder
        ports = free_ports(2 * size)
        self.members = [
            Member(f"m{i}", ports[2 * i], ports[2 * i + 1], folder / f"m{i}", address=address)
            for i in range(size)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The ``--store`` value for shoal: ``etcd://a:1,b:2``."""
        return "etcd://" + ",".join(self.endpoints)

    def start(self, timeout: float = 20.0) -> EtcdCluster:
        initial = ",".join(f"{m.name}=http://{self.address}:{m.peer_port}" for m in self.members)
        for m in self.members:
            self._spawn(m, initial)
        deadline = time.monotonic() + timeout
        for m in self.members:
            self._wait_healthy(m, deadline)
        return self

    def _spawn(self, m: Member, initial: str) -> None:
        m.data_dir.mkdir(parents=True, exist_ok=True)
        m.log = self.folder / f"{m.name}.log"
        scheme = "https" if self.tls_dir else "http"
        client, peer = f"{scheme}://{m.endpoint}", f"http://{self.address}:{m.peer_port}"
        args = [
            self.binary,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=shoal-test-{self.members[0].peer_port}",
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--logger=zap",
            "--log-level=error",
        ]
        if self.tls_dir:
            args += [
                f"--cert-file={self.tls_dir / 'head.crt'}",
                f"--key-file={self.tls_dir / 'head.key'}",
                f"--trusted-ca-file={self.tls_dir / 'ca.crt'}",
                "--client-cert-auth",
            ]
        with open(m.log, "ab") as log:
            m.process = self._launch(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_healthy(self, m: Member, deadline: float) -> None:
        while True:
            assert m.process is not None
            if m.process.poll() is not None:
                raise RuntimeError(f"etcd {m.name} exited: {m.log.read_text()[-2000:]}")
            try:
                with self._open(f"{m.endpoint}/health") as reply:
                    if b'"true"' in reply.read():
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd {m.name} not healthy: {m.log.read_text()[-2000:]}")
            time.sleep(0.05)  # polling a child process's readiness: nothing to wait on instead

    def _open(self, where: str) -> Any:
        if self.tls_dir is None:
            return urllib.request.urlopen(f"http://{where}", timeout=1)
        context = ssl.create_default_context(cafile=str(self.tls_dir / "ca.crt"))
        context.load_cert_chain(self.tls_dir / "client.crt", self.tls_dir / "client.key")
        return urllib.request.urlopen(f"https://{where}", timeout=1, context=context)

    def kill(self, index: int) -> None:
        """SIGKILL one member (it is not restarted)."""
        self._end(self.members[index], signal.SIGKILL)

    def stop(self) -> None:
        for m in self.members:
            self._end(m, signal.SIGTERM)

    def _end(self, m: Member, sig: signal.Signals) -> None:
        process, m.process = m.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def require_etcd() -> None:
    """Skip the calling test when etcd is not installed; fail instead under CI (``CI=true``),
    where ``make system-deps`` must have installed it."""
    import pytest  # a test helper: pytest is there whenever this is called

    if etcd_binary() is not None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("etcd is not installed under CI: make system-deps installs etcd-server")
    pytest.skip("etcd is not installed: make system-deps installs etcd-server (as root)")


DEAD_AFTER_S = 4.0


class EtcdHeads:
    """``shoal head`` processes on one etcd (their own key prefix), a ``shoal scheduler`` that
    knows all of them, and a control client for all of them. The short intervals of ``FAST``
    but ``dead_after_s`` 4, so that the leader lease lasts 2 s: a 1 s lease is lost to a
    stalled event loop on a busy 2-core machine."""

    def __init__(self, root: Path, etcd: EtcdCluster) -> None:
        self.env = {**os.environ, **FAST}
        self.env.pop("SHOAL_HEAD", None)
        self.env["SHOAL_STORE_ROOT"] = f"cluster-{uuid.uuid4().hex}/"
        self.env["SHOAL_DEAD_AFTER_S"] = str(DEAD_AFTER_S)
        self.root = root
        self.etcd = etcd
        self.heads: list[Component] = []
        self.scheduler: Component | None = None
        self.settings = Settings.load(env={}, flags={"dead_after_s": DEAD_AFTER_S, "rpc_timeout_s": 2.0})

    def start_head(self) -> Component:
        i = len(self.heads)
        args = ["head", "--port", "0", "--http-port", "0", "--store", self.etcd.url]
        comp = Component(f"head{i}", args, self.root / f"head{i}", self.env)
        comp.start(("head", "head_http"))
        self.heads.append(comp)
        return comp

    def restart_head(self, head: Component) -> None:
        """Start ``head`` again (after it exited) on the ports it had."""
        port = head.endpoints["head"].rsplit(":", 1)[1]
        http = head.endpoints["head_http"].rsplit(":", 1)[1]
        head.args = ["head", "--port", port, "--http-port", http, "--store", self.etcd.url]
        head.start(("head", "head_http"))

    def start_scheduler(self) -> Component:
        args = ["--head", self.addresses, "scheduler", "--grpc-port", "0", "--http-port", "0"]
        self.scheduler = Component("scheduler", args, self.root / "scheduler", self.env)
        self.scheduler.start(("scheduler", "scheduler_http"))
        return self.scheduler

    @property
    def addresses(self) -> str:
        return ",".join(h.endpoints["head"] for h in self.heads)

    def client(self) -> ControlClient:
        return ControlClient(self.addresses, self.settings)

    def close(self) -> None:
        comps = [c for c in (self.scheduler, *self.heads) if c is not None]
        for comp in comps:
            comp.signal(signal.SIGTERM)
        for comp in comps:
            if comp.proc is not None:
                try:
                    comp.wait(15)
                except Exception:
                    pass
            comp.kill_all()


def echo_spec(name: str, replicas: int, examples: Path) -> dict[str, Any]:
    """A deployment of ``examples/echo.py`` (the repository's examples folder)."""
    return {
        "name": name,
        "backend": "python",
        "model": "echo:Echo",
        "base_dir": str(examples),
        "replicas": replicas,
        "resources": {"cpus": 0.1},
    }


async def wait_ready(client: ControlClient, name: str, count: int, timeout_s: float = 30) -> list[Any]:
    """Wait until ``name`` has ``count`` replicas, all READY; their ``(id, pid)``, sorted."""
    async with asyncio.timeout(timeout_s):
        while True:
            status = (await client.status()).to_json()
            for dep in status["deployments"]:
                ready = [r for r in dep["replicas"] if r["state"] == "READY"]
                if dep["name"] == name and len(ready) == count == len(dep["replicas"]):
                    return sorted((r["id"], r["pid"]) for r in ready)
            await asyncio.sleep(0.1)
