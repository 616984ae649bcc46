"""Connections dealt in turn over sockets sharing a port (``shoal.core.reuseport``), with
real sockets and the real eBPF program; skipped, with the kernel's reason, where this
process may not load eBPF (no CAP_BPF or CAP_SYS_ADMIN)."""

from __future__ import annotations

import os
import platform
import socket
import time
from collections.abc import Iterator

import pytest

from shoal.core.reuseport import deal_in_turn, deal_port_in_turn, listening_sockets

pytestmark = pytest.mark.timeout(10)


def group(n: int) -> list[socket.socket]:
    """``n`` listening sockets sharing one port of 127.0.0.1, not blocking on accept."""
    socks: list[socket.socket] = []
    port = 0
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        s.setblocking(False)
        port = s.getsockname()[1]
        socks.append(s)
    return socks


def accepted(socks: list[socket.socket]) -> list[int]:
    """How many connections each socket has waiting; accepts (and closes) them."""
    counts = []
    for s in socks:
        n = 0
        while True:
            try:
                conn, _ = s.accept()
            except BlockingIOError:
                break
            conn.close()
            n += 1
        counts.append(n)
    return counts


def connect(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    made = group(3)
    yield made
    for s in made:
        s.close()


def dealt_or_skip(sock: socket.socket, n: int) -> None:
    why = deal_in_turn(sock, n)
    if why is not None:
        pytest.skip(why)


def until_accepted(socks: list[socket.socket], total: int) -> list[int]:
    counts = [0] * len(socks)
    for _ in range(200):
        counts = [a + b for a, b in zip(counts, accepted(socks), strict=True)]
        if sum(counts) >= total:
            break
        time.sleep(0.01)
    return counts


def test_connections_are_dealt_in_turn_not_by_their_addresses(socks: list[socket.socket]) -> None:
    dealt_or_skip(socks[0], 3)
    port = socks[0].getsockname()[1]
    clients = connect(port, 12)
    try:
        assert until_accepted(socks, 12) == [4, 4, 4]
    finally:
        for c in clients:
            c.close()


def test_a_group_short_of_a_socket_still_takes_every_connection(socks: list[socket.socket]) -> None:
    dealt_or_skip(socks[0], 3)
    port = socks[0].getsockname()[1]
    socks.pop().close()  # one process of three is down: its turns fall back to the hash
    clients = connect(port, 9)
    try:
        counts = until_accepted(socks, 9)
        assert sum(counts) == 9
        assert min(counts) >= 3  # the two live sockets' own turns at least
    finally:
        for c in clients:
            c.close()


def test_a_port_is_dealt_by_its_number_with_the_other_groups_named(socks: list[socket.socket]) -> None:
    # How a scheduler deals its gRPC port (sockets gRPC made, found by number) and its HTTP
    # socket (its own) at once.
    port = socks[0].getsockname()[1]
    others = group(3)
    try:
        why = deal_port_in_turn(port, 3, others[0])
        if why is not None:
            pytest.skip(why)
        clients = connect(port, 6) + connect(others[0].getsockname()[1], 6)
        try:
            assert until_accepted(socks, 6) == [2, 2, 2]
            assert until_accepted(others, 6) == [2, 2, 2]
        finally:
            for c in clients:
                c.close()
    finally:
        for s in others:
            s.close()


def test_one_socket_is_left_to_the_kernel() -> None:
    [s] = group(1)
    with s:
        assert deal_in_turn(s, 1) == "one socket: nothing to deal"


def test_listening_sockets_finds_this_processs_listeners_on_a_port(socks: list[socket.socket]) -> None:
    port = socks[0].getsockname()[1]
    found = listening_sockets(port)
    try:
        assert sorted(s.getsockname() for s in found) == sorted(s.getsockname() for s in socks)
        assert len(found) == 3
    finally:
        for s in found:
            s.close()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))  # bound, not listening: not one of them
        assert listening_sockets(other.getsockname()[1]) == []


def test_elsewhere_than_linux_the_kernels_rule_stays_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    [s] = group(1)
    with s:
        port = s.getsockname()[1]
        monkeypatch.setattr(platform, "system", lambda: "Darwin")
        assert deal_in_turn(s, 2) == "dealing in turn needs Linux's eBPF, not Darwin's"

        def no_proc(path: str) -> list[str]:
            raise FileNotFoundError(path)

        monkeypatch.setattr(os, "listdir", no_proc)
        assert listening_sockets(port) == []
