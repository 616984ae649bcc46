"""Several hosts on one machine: Linux network namespaces on a private bridge, and faults
injected between them. Needs root and ``ip`` (iproute2); partitions need ``iptables``.

    with Hosts(3) as hosts:                       # head, two schedulers
        async with NetCluster(hosts, tmp_path) as cluster:
            await cluster.deploy(spec)
            hosts.partition(hosts[1], hosts[0])   # scheduler 0 cannot reach the head
            hosts.heal(hosts[1], hosts[0])

The network. Every host is a namespace ``shoal-<pid>-<n>-h<i>`` with loopback and one
``eth0`` at ``10.77.<run>.<i+1>/24``; the other end of each ``eth0`` veth sits in a
namespace of its own (``shoal-<pid>-<n>-br``) and is enslaved to the bridge ``br0``
there. Nothing of it lives in the machine's own namespace except, with ``gateway=True``
(the default), one more veth whose root end has ``10.77.<run>.254/24``: the test process
reaches the hosts through it like a client on the same network. The root namespace
forwards nothing (its ``ip_forward`` is left alone) and gets no firewall rule, so the
machine's real interfaces are never crossed. ``<run>`` comes from the pid and skips
subnets the root namespace already routes, so parallel runs do not collide.

Faults: :meth:`Hosts.partition` drops, in both namespaces, every packet arriving from the
other host (a silent partition, as a cut cable: no RST, no ICMP); :meth:`Hosts.delay`
adds latency and loss on a host's outgoing packets with ``tc netem`` or, on kernels
built without netem, an NFQUEUE rule served by a small verdict loop in that namespace
(``python -m shoal.testing.netns nfqueue``); :meth:`Hosts.pause` stops every process
in a namespace with SIGSTOP (a host that hangs: its sockets stay open).

:meth:`Hosts.close` kills every process in every namespace (replicas included, wherever
they were started from) and deletes the namespaces, which takes their links, rules and
qdiscs with them. Namespaces left by a run that was killed are swept by the next one.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from shoal.testing.cluster import Component, ProcessCluster, _wait_file

PREFIX = "shoal-"
_NAME = re.compile(r"^shoal-(\d+)-(\d+)-(br|h\d+)$")
_GW_LINK = re.compile(r"^shg(\d+)n(\d+)$")
_seq = itertools.count()


class NetnsError(RuntimeError):
    """A command that builds or changes the test network failed."""


def _run(
    args: Sequence[str], *, check: bool = True, timeout: float = 10.0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (``None`` when they can): not root, no ``ip``,
    no ``iptables``, or the kernel refuses. Creates and deletes one probe namespace."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root; try sudo)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (Debian: apt-get install iproute2 iptables; make test does it)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
        try:
            _run(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
            _run(["ip", "netns", "exec", probe, "iptables", "-w", "-S"])
        finally:
            _run(["ip", "netns", "del", probe], check=False)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as err:
        return f"cannot build network namespaces here: {err}"
    return None


@dataclass
class Host:
    """One machine of the test network: a namespace with one address."""

    index: int
    netns: str
    address: str
    dev: str = "eth0"
    helpers: set[int] = field(default_factory=set)  # our own processes inside (nfqueue loops)
    delay_mechanism: str = ""  # "netem" or "nfqueue" while a delay is on
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)  # reaped by Hosts.close

    def cmd(self, *args: str) -> list[str]:
        """``args`` as a command that runs inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self.cmd(*args), check=check)

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a process in this namespace (``ip netns exec`` execs it: the pid is the process's)."""
        proc = subprocess.Popen(self.cmd(*args), **kwargs)
        self.started.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process whose network namespace is this host's (replicas included)."""
        out = _run(["ip", "netns", "pids", self.netns], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def __str__(self) -> str:
        return f"host {self.index} ({self.address})"


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_pids(pids: Sequence[int], timeout_s: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGCONT)  # a stopped process dies of SIGKILL too; be explicit
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def sweep_stale() -> list[str]:
    """Delete namespaces and gateway links left by runs whose process is gone; returns their names."""
    swept = []
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            pids = [int(p) for p in _run(["ip", "netns", "pids", name], check=False).stdout.split()]
            _kill_pids(pids)
            _run(["ip", "netns", "del", name], check=False)
            swept.append(name)
    for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        parts = line.split(":")
        link = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        m = _GW_LINK.match(link)
        if m and not _pid_alive(int(m.group(1))):
            _run(["ip", "link", "del", link], check=False)
            swept.append(link)
    return swept


def _routed_subnets() -> set[str]:
    """``10.77.X`` prefixes the root namespace already has routes or addresses for."""
    text = _run(["ip", "-4", "route", "show"], check=False).stdout
    text += _run(["ip", "-4", "addr", "show"], check=False).stdout
    return set(re.findall(r"\b10\.77\.(\d+)\.", text))


class Hosts:
    """``count`` hosts on one private bridge. Not safe for use from several threads at once.

    Lifecycle: ``start()`` / ``close()``, or ``with Hosts(n) as hosts``. ``close()`` is
    idempotent and also runs when ``start()`` fails half way.
    """

    def __init__(self, count: int, *, gateway: bool = True) -> None:
        if count < 1:
            raise ValueError("at least one host")
        self.count = count
        self.gateway = gateway
        pid = os.getpid()
        seq = next(_seq)
        self.tag = f"{PREFIX}{pid}-{seq}"
        self.bridge_ns = f"{self.tag}-br"
        self.gateway_link = f"shg{pid}n{seq}"
        self.run = 0
        self.hosts: list[Host] = []
        self.gateway_address = ""
        self._namespaces: list[str] = []
        self._partitions: set[tuple[int, int]] = set()
        self._paused: set[int] = set()
        self._nfq_loops: dict[int, subprocess.Popen[bytes]] = {}
        self._started = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Hosts:
        sweep_stale()
        self._started = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        taken = _routed_subnets() if self.gateway else set()
        base = os.getpid() % 250
        for k in range(250):
            run = (base + k) % 250 + 1
            if str(run) not in taken:
                break
        else:
            raise NetnsError("every subnet 10.77.1-250.0/24 is in use in the root namespace")
        self.run = run
        prefix = f"10.77.{run}"
        br = self.bridge_ns
        self._add_ns(br)
        _run(["ip", "-n", br, "link", "set", "lo", "up"])
        _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", br, "link", "set", "br0", "up"])
        for i in range(self.count):
            host = Host(index=i, netns=f"{self.tag}-h{i}", address=f"{prefix}.{i + 1}")
            self._add_ns(host.netns)
            port = f"p{i}"
            _run(
                [
                    "ip",
                    "-n",
                    host.netns,
                    "link",
                    "add",
                    host.dev,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    port,
                    "netns",
                    br,
                ]
            )
            _run(["ip", "-n", br, "link", "set", port, "master", "br0"])
            _run(["ip", "-n", br, "link", "set", port, "up"])
            _run(["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.dev])
            _run(["ip", "-n", host.netns, "link", "set", host.dev, "up"])
            _run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
            self.hosts.append(host)
        if self.gateway:
            self.gateway_address = f"{prefix}.254"
            _run(["ip", "link", "add", self.gateway_link, "type", "veth", "peer", "name", "gw", "netns", br])
            _run(["ip", "-n", br, "link", "set", "gw", "master", "br0"])
            _run(["ip", "-n", br, "link", "set", "gw", "up"])
            _run(["ip", "addr", "add", f"{self.gateway_address}/24", "dev", self.gateway_link])
            _run(["ip", "link", "set", self.gateway_link, "up"])

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)

    def close(self) -> None:
        """Kill every process in the namespaces, then delete them (links, rules and qdiscs go with them)."""
        if not self._started:
            return
        self._started = False
        pids = [p for ns in self._namespaces for p in _ns_pids(ns)]
        _kill_pids(pids)
        for host in self.hosts:
            for proc in host.started:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait(5)
                for pipe in (proc.stdin, proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
            host.started.clear()
        if self.gateway:
            _run(["ip", "link", "del", self.gateway_link], check=False)
        for ns in reversed(self._namespaces):
            _run(["ip", "netns", "del", ns], check=False)
        self._namespaces.clear()
        self._partitions.clear()
        self._paused.clear()

    def __enter__(self) -> Hosts:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    # ------------------------------------------------------------ partitions

    def partition(self, a: Host, b: Host) -> None:
        """Cut ``a`` from ``b`` both ways: each drops every packet from the other. Idempotent."""
        key = (min(a.index, b.index), max(a.index, b.index))
        if key in self._partitions:
            return
        for me, peer in ((a, b), (b, a)):
            me.run("iptables", "-w", "-I", "INPUT", *self._drop_rule(peer))
        self._partitions.add(key)

    def heal(self, a: Host, b: Host) -> None:
        """Undo :meth:`partition`. Idempotent."""
        key = (min(a.index, b.index), max(a.index, b.index))
        if key not in self._partitions:
            return
        for me, peer in ((a, b), (b, a)):
            me.run("iptables", "-w", "-D", "INPUT", *self._drop_rule(peer))
        self._partitions.discard(key)

    def isolate(self, a: Host) -> None:
        """Partition ``a`` from every other host (it still reaches the gateway, i.e. the test's clients)."""
        for b in self.hosts:
            if b is not a:
                self.partition(a, b)

    def heal_all(self) -> None:
        for i, j in sorted(self._partitions):
            self.heal(self.hosts[i], self.hosts[j])

    @staticmethod
    def _drop_rule(peer: Host) -> list[str]:
        return ["-s", peer.address, "-m", "comment", "--comment", "shoal-partition", "-j", "DROP"]

    # ------------------------------------------------------------ slow links

    def delay(self, host: Host, ms: float, loss_pct: float = 0.0) -> str:
        """Delay every packet ``host`` sends on the test network by ``ms`` and drop ``loss_pct``
        percent of them. Replaces an earlier delay. Returns the mechanism: ``netem``, or
        ``nfqueue`` where the kernel has no netem."""
        self.undelay(host)
        netem = ["tc", "qdisc", "replace", "dev", host.dev, "root", "netem", "delay", f"{ms:g}ms"]
        if loss_pct:
            netem += ["loss", f"{loss_pct:g}%"]
        proc = host.run(*netem, check=False)
        if proc.returncode == 0:
            host.delay_mechanism = "netem"
            return "netem"
        if "unknown" not in proc.stderr.lower() and "no such file" not in proc.stderr.lower():
            raise NetnsError(f"tc netem in {host}: {proc.stderr.strip()}")
        # No sch_netem in this kernel: hold each outgoing packet in an NFQUEUE and let a
        # small loop in the namespace give its verdict (accept, or drop for loss) later.
        queue = 7
        loop = host.popen(
            [
                sys.executable,
                "-m",
                "shoal.testing.netns",
                "nfqueue",
                "--queue",
                str(queue),
                "--delay-ms",
                f"{ms:g}",
                "--loss-pct",
                f"{loss_pct:g}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        host.helpers.add(loop.pid)
        assert loop.stdout is not None
        line = loop.stdout.readline().decode().strip()
        if line != "bound":
            loop.kill()
            err = loop.stderr.read().decode() if loop.stderr else ""
            host.helpers.discard(loop.pid)
            raise NetnsError(f"nfqueue delay loop in {host} did not start: {line} {err.strip()}")
        loop.stdout.close()
        if loop.stderr is not None:
            loop.stderr.close()
        self._nfq_loops[host.index] = loop
        # --queue-bypass: if the loop dies, packets flow instead of vanishing.
        host.run("iptables", "-w", "-I", "OUTPUT", *self._nfq_rule(host, queue))
        host.delay_mechanism = "nfqueue"
        return "nfqueue"

    def undelay(self, host: Host) -> None:
        """Remove the delay and loss of :meth:`delay` (a no-op when none is on)."""
        if host.delay_mechanism == "netem":
            host.run("tc", "qdisc", "del", "dev", host.dev, "root", check=False)
        elif host.delay_mechanism == "nfqueue":
            host.run("iptables", "-w", "-D", "OUTPUT", *self._nfq_rule(host, 7), check=False)
            loop = self._nfq_loops.pop(host.index, None)
            if loop is not None:
                loop.kill()
                loop.wait(5)
                host.helpers.discard(loop.pid)
        host.delay_mechanism = ""

    @staticmethod
    def _nfq_rule(host: Host, queue: int) -> list[str]:
        return ["-o", host.dev, "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]

    # ------------------------------------------------------------ hung hosts

    def pause(self, host: Host) -> list[int]:
        """SIGSTOP every process in ``host`` (its sockets stay open, nothing answers); returns the pids."""
        pids = [p for p in host.pids() if p not in host.helpers]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self._paused.add(host.index)
        return pids

    def resume(self, host: Host) -> None:
        """SIGCONT every process in ``host``."""
        for pid in host.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._paused.discard(host.index)

    def calm(self) -> None:
        """Undo every fault: heal partitions, remove delays, resume paused hosts."""
        self.heal_all()
        for host in self.hosts:
            self.undelay(host)
        for i in sorted(self._paused):
            self.resume(self.hosts[i])


def _ns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


# ---------------------------------------------------------------- shoal across hosts


class NsComponent(Component):
    """A head or scheduler process inside a host's namespace, bound to the host's address."""

    def __init__(self, name: str, args: list[str], state: Path, env: Mapping[str, str], host: Host) -> None:
        super().__init__(name, args, state, env)
        self.host = host

    def start(self, keys: tuple[str, ...]) -> None:
        # As Component.start, with the command run through ``ip netns exec``.
        self.state.mkdir(parents=True, exist_ok=True)
        ep = self.state / "endpoints.json"
        if ep.exists():
            ep.unlink()
        bind = ["--host", self.host.address, "--advertise-host", self.host.address]
        with open(self.log, "ab") as out:
            self.proc = self.host.popen(
                [sys.executable, "-m", "shoal.cli", *self.args, *bind, "--state", str(self.state)],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while True:
            doc = _wait_file(ep, self.proc, self.log)
            if all(k in doc for k in keys):
                self.endpoints = doc
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not report {keys}")
            time.sleep(0.05)


class NetCluster(ProcessCluster):
    """A head on ``hosts[0]`` and a scheduler on each further host, every one a process in
    its host's namespace, bound to its address (``--host`` and ``--advertise-host``), so
    that all traffic between head, schedulers and replicas crosses the test network.

    Schedulers have stable ids ``sched-<i>`` (``i`` from 0), so a restarted one rejoins
    as itself. ``close()`` undoes every fault first, then kills everything (the state
    folders are throwaway; ``Hosts.close`` kills whatever is left in the namespaces).
    """

    def __init__(
        self,
        hosts: Hosts,
        root: Path,
        *,
        env: Mapping[str, str] | None = None,
        scheduler_args: list[list[str]] | None = None,
    ) -> None:
        if not hosts.gateway:
            raise ValueError("NetCluster drives the cluster from the test process: it needs the gateway")
        # Plaintext between the namespaces: a private test network (no --tls-dir).
        super().__init__(
            root,
            schedulers=len(hosts) - 1,
            env={"SHOAL_INSECURE": "1", **(env or {})},
            scheduler_args=scheduler_args,
        )
        self.hosts = hosts

    async def __aenter__(self) -> NetCluster:
        await super().__aenter__()
        await self.wait_registered()
        return self

    async def wait_registered(self, timeout_s: float = 30.0) -> None:
        """Wait until the head lists every scheduler ALIVE (they register after they report
        their endpoints): a deployment made before that is placed on the first ones only."""
        ids = {f"sched-{i}" for i in range(len(self.schedulers))}
        await self.wait_for(
            lambda s: ids <= {x["id"] for x in s["schedulers"] if x["state"] == "ALIVE"},
            timeout_s=timeout_s,
            what=f"schedulers {sorted(ids)} registered",
        )

    def start(self) -> None:
        head_host = self.hosts[0]
        self.head = NsComponent(
            "head", ["head", "--port", "0", "--http-port", "0"], self.root / "head", self.env, head_host
        )
        self.head.start(("head", "head_http"))
        for i in range(self.n_schedulers):
            self.add_scheduler(self.scheduler_args[i] if i < len(self.scheduler_args) else [])

    def add_scheduler(self, extra: list[str] | None = None) -> Component:
        i = len(self.schedulers)
        comp = NsComponent(
            f"scheduler{i}",
            [
                "--head",
                self.head_address,
                "scheduler",
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                "--scheduler-id",
                f"sched-{i}",
                *(extra or []),
            ],
            self.root / f"scheduler{i}",
            self.env,
            self.hosts[i + 1],
        )
        comp.start(("scheduler", "scheduler_http"))
        self.schedulers.append(comp)
        return comp

    def restart_scheduler(self, i: int) -> None:
        """Start scheduler ``i`` again (after it was killed) with its id, on its ports."""
        comp = self.schedulers[i]
        port = comp.endpoints["scheduler"].rsplit(":", 1)[1]
        http = comp.endpoints["scheduler_http"].rsplit(":", 1)[1]
        args = list(comp.args)
        args[args.index("--grpc-port") + 1] = port
        args[args.index("--http-port") + 1] = http
        comp.args = args
        comp.start(("scheduler", "scheduler_http"))

    def scheduler_host(self, i: int) -> Host:
        return self.hosts[i + 1]

    @property
    def head_host(self) -> Host:
        return self.hosts[0]

    @property
    def head_http(self) -> str:
        assert self.head is not None
        return self.head.endpoints["head_http"]

    async def close(self) -> None:
        self.hosts.calm()
        if self._client is not None:
            await self._client.close()
            self._client = None
        for comp in [*self.schedulers, *([self.head] if self.head else [])]:
            comp.kill_all()
        for pid in self._pids_seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- the NFQUEUE delay loop

# nfnetlink_queue, from <linux/netfilter/nfnetlink_queue.h>: just what a verdict loop needs.
_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_PACKET, _NFQNL_MSG_VERDICT, _NFQNL_MSG_CONFIG = 0, 1, 2
_NFQA_PACKET_HDR, _NFQA_VERDICT_HDR = 1, 2
_NFQA_CFG_CMD, _NFQA_CFG_PARAMS = 1, 2
_NFQNL_CFG_CMD_BIND, _NFQNL_COPY_META = 1, 1
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_NLMSG_ERROR = 2
_NF_DROP, _NF_ACCEPT = 0, 1


def _nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def _nfq_msg(kind: int, queue: int, attrs: Sequence[bytes], flags: int = _NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (_NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0, 0) + body


def _packet_ids(data: bytes) -> list[int]:
    """Packet ids of the NFQNL_MSG_PACKET messages in one netlink read."""
    ids = []
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if kind == (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_PACKET:
            a = off + 20  # nlmsghdr (16) + nfgenmsg (4)
            while a + 4 <= off + length:
                alen, akind = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if akind & 0x7FFF == _NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, a + 4)[0])
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    return ids


def nfqueue_loop(queue: int, delay_ms: float, loss_pct: float) -> None:
    """Serve NFQUEUE ``queue`` in this namespace: accept each packet ``delay_ms`` after it
    was queued, or drop it with probability ``loss_pct``/100. Prints ``bound`` once it
    serves the queue; runs until killed."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((0, 0))

    def configure(attr: bytes) -> None:
        sock.send(_nfq_msg(_NFQNL_MSG_CONFIG, queue, [attr], _NLM_F_REQUEST | _NLM_F_ACK))
        data = sock.recv(65536)
        if struct.unpack_from("=H", data, 4)[0] == _NLMSG_ERROR:
            errno = -struct.unpack_from("=i", data, 16)[0]
            if errno:
                raise OSError(errno, os.strerror(errno))

    configure(_nla(_NFQA_CFG_CMD, struct.pack("=BBH", _NFQNL_CFG_CMD_BIND, 0, socket.htons(socket.AF_INET))))
    configure(_nla(_NFQA_CFG_PARAMS, struct.pack("!IB", 0, _NFQNL_COPY_META)))
    print("bound", flush=True)
    sock.setblocking(False)
    delay = delay_ms / 1000
    loss = loss_pct / 100
    rng = random.Random()
    due: list[tuple[float, int]] = []
    while True:
        wait = max(0.0, due[0][0] - time.monotonic()) if due else None
        readable, _, _ = select.select([sock], [], [], wait)
        if readable:
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                at = time.monotonic() + delay
                for pid in _packet_ids(data):
                    heapq.heappush(due, (at, pid))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, pid = heapq.heappop(due)
            verdict = _NF_DROP if loss and rng.random() < loss else _NF_ACCEPT
            attr = _nla(_NFQA_VERDICT_HDR, struct.pack("!II", verdict, pid))
            sock.send(_nfq_msg(_NFQNL_MSG_VERDICT, queue, [attr]))


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
