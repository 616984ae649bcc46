"""The test network itself: hosts reach each other and the test process through the bridge,
and each fault does what it says, without touching the machine's own namespace."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from shoal.testing.netns import Host, Hosts

pytestmark = pytest.mark.timeout(60)

ECHO_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000))
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    while (d := c.recv(100)):
        c.send(d)
    c.close()
"""

# Round trips of N one-byte messages to HOST:9000: "median max" in ms, or "fail <error>".
RTT = """
import socket, sys, time
try:
    s = socket.create_connection((sys.argv[1], 9000), timeout=float(sys.argv[2]))
    ts = []
    for _ in range(int(sys.argv[3])):
        t = time.perf_counter(); s.send(b"x"); s.recv(10); ts.append((time.perf_counter() - t) * 1000)
    print(sorted(ts)[len(ts) // 2], max(ts))
except OSError as err:
    print("fail", err)
"""


def rtts(host: Host | None, target: Host, timeout_s: float = 0.5, n: int = 10) -> tuple[float, float] | None:
    """(median, max) round trip in ms from ``host`` (None: the test process) to ``target``; None when cut."""
    cmd = [sys.executable, "-c", RTT, target.address, str(timeout_s), str(n)]
    out = (host.run(*cmd) if host else subprocess.run(cmd, capture_output=True, text=True, check=True)).stdout
    if out.startswith("fail"):
        return None
    median, longest = out.split()
    return float(median), float(longest)


def rtt_from(host: Host | None, target: Host) -> float | None:
    got = rtts(host, target)
    return None if got is None else got[0]


@pytest.fixture
def hosts(netns_ready: None) -> Iterator[Hosts]:
    with Hosts(3) as hosts:
        servers = [
            h.popen([sys.executable, "-c", ECHO_SERVER, h.address], stdout=subprocess.PIPE)
            for h in hosts.hosts
        ]
        for s in servers:
            assert s.stdout is not None and s.stdout.readline().strip() == b"listening"
        yield hosts


def root_state() -> str:
    return (
        subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        + subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )


def test_hosts_reach_each_other_and_cleanup_leaves_nothing(netns_ready: None) -> None:
    with Hosts(3) as hosts:
        assert len({h.address for h in hosts.hosts}) == 3
        assert all(h.address.startswith(f"10.77.{hosts.run}.") for h in hosts.hosts)
        assert hosts.gateway_address == f"10.77.{hosts.run}.254"
        server = hosts[2].popen([sys.executable, "-c", ECHO_SERVER, hosts[2].address], stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline().strip() == b"listening"
        assert rtt_from(hosts[0], hosts[2]) is not None
        assert rtt_from(None, hosts[2]) is not None  # the test process, through the gateway
        assert server.pid in hosts[2].pids()
        # A host's own loopback works and its address is not reachable from the root's loopback.
        assert hosts[0].run("ip", "-o", "addr", "show", "dev", "lo").stdout.count("127.0.0.1") == 1
        made = hosts.namespaces()
        gateway = hosts.gateway_link
        assert all(ns in root_state() for ns in made) and gateway in root_state()
    # Only this run's namespaces and gateway link count: another test's (a fixture torn down
    # around this one) may come and go meanwhile. The kernel removes a link whose peer's
    # namespace was deleted a moment later, so the check waits a little for that.
    deadline = time.monotonic() + 5.0
    while True:
        after = root_state()
        left = [name for name in (*made, gateway) if name in after]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"namespaces or links left behind: {left}"
    assert server.poll() is not None, "process in a namespace survived close()"


def test_partition_is_silent_both_ways_and_heals(hosts: Hosts) -> None:
    a, b, c = hosts.hosts
    hosts.partition(a, b)
    assert rtt_from(a, b) is None
    assert rtt_from(b, a) is None
    assert rtt_from(a, c) is not None and rtt_from(c, b) is not None  # only that pair is cut
    assert rtt_from(None, b) is not None  # clients still reach both
    hosts.partition(a, b)  # idempotent
    hosts.heal(a, b)
    assert rtt_from(a, b) is not None and rtt_from(b, a) is not None
    hosts.isolate(c)
    assert rtt_from(a, c) is None and rtt_from(b, c) is None
    hosts.heal_all()
    assert rtt_from(a, c) is not None


def test_delay_adds_latency_and_goes_away(hosts: Hosts) -> None:
    a, b, _ = hosts.hosts
    base = rtt_from(a, b)
    assert base is not None and base < 20
    mechanism = hosts.delay(b, 40)
    assert mechanism in ("netem", "nfqueue")
    slow = rtt_from(a, b)
    assert slow is not None and 38 <= slow <= 200, (mechanism, slow)
    hosts.undelay(b)
    fast = rtt_from(a, b)
    assert fast is not None and fast < 20


# Connects, says "ready", waits for a line on stdin (the loss is on by then), then makes round
# trips until one waits for a retransmission (>= 150 ms) or 60 are done: "n longest" in ms.
LOSSY_RTT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 9000), timeout=60)
s.send(b"x"); s.recv(10)
print("ready", flush=True)
sys.stdin.readline()
longest = 0.0
for n in range(1, 61):
    t = time.perf_counter(); s.send(b"x"); s.recv(10)
    longest = max(longest, (time.perf_counter() - t) * 1000)
    if longest >= 150:
        break
print(n, longest, flush=True)
"""


@pytest.mark.timeout(120)
def test_loss_drops_packets_and_tcp_retransmits(hosts: Hosts) -> None:
    a, b, _ = hosts.hosts
    # The connection is made before the loss starts (a lost SYN-ACK waits 1 s, 3 s, 7 s ...),
    # and the client stops at the first round trip that waited for a retransmission, so only
    # one round trip's tail of repeated losses counts (six in a row at 30%: 0.07%, 12.6 s).
    client = a.popen(
        [sys.executable, "-c", LOSSY_RTT, b.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert client.stdout is not None and client.stdout.readline().strip() == b"ready"
    hosts.delay(b, 1, loss_pct=30)
    try:
        out, _ = client.communicate(b"go\n", timeout=90)
    finally:
        hosts.undelay(b)
    assert client.returncode == 0, out
    rounds, longest = out.split()
    # 60 round trips through 30% loss with none lost has odds of 0.7**60, about 5e-10.
    assert float(longest) >= 150, f"no round trip waited for a retransmission in {rounds.decode()}"


def test_pause_stops_every_process_of_a_host(hosts: Hosts) -> None:
    a, b, _ = hosts.hosts
    stopped = hosts.pause(b)
    assert stopped
    assert rtt_from(a, b) is None  # the kernel still accepts the connection; nobody answers
    hosts.resume(b)
    assert rtt_from(a, b) is not None
