"""Connections dealt in turn over the processes that share a port (SO_REUSEPORT).

By default Linux gives each new connection to one of the sockets sharing a port by a hash
of its addresses. With few connections that is a coin toss per connection: six
connections (what perf_analyzer opens at c=32) over two ingress processes fell 3/3 in 6
of 20 tries, 4/2 in 12 and 5/1 in 2 (``bench/ingress_split.py``); in one A/B round all
six fell on one process, which then did all the ingress work. A gRPC channel is one
connection, so a few long-lived clients can do the same. Where a process, not the
machine, is the limit (more cores than busy processes), an uneven split leaves cores idle
while one process saturates. On the 2-core test machines the cores are the limit, and
perf_analyzer c=32 served the same either way (median 2,318 against 2,301 requests a
second, 8 rounds each, interleaved).

:func:`deal_in_turn` attaches to the port's group a small eBPF program that keeps a counter
and answers ``counter++ % n``: connection k goes to the k-th socket (in the order the
processes joined), so the split is even whatever the addresses. Loading it needs
CAP_BPF or CAP_SYS_ADMIN (unprivileged eBPF is off on most distributions); without them,
or on a kernel without it, the kernel's hash stays and the function says why.

Program, 16 instructions (BPF_PROG_TYPE_SOCKET_FILTER, which SO_ATTACH_REUSEPORT_EBPF
takes; its return value is the index of the socket, and an index past the group's
sockets falls back to the hash, so a group short of a process still takes every connection)::

    *(u32 *)(r10 - 4) = 0            key 0
    r1 = map ; r2 = r10 - 4
    r0 = bpf_map_lookup_elem(r1, r2) the counter
    if r0 == 0 goto zero
    r1 = *(u32 *)(r0 + 0) ; r2 = r1 + 1 ; *(u32 *)(r0 + 0) = r2
    r0 = r1 % n ; exit
    zero: r0 = 0 ; exit

The counter's read and write are not one atomic step: two SYNs handled at the same
instant on two CPUs may take the same turn, which leaves the split off by one, no worse.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}
_BPF_MAP_CREATE = 0
_BPF_PROG_LOAD = 5
_BPF_MAP_TYPE_ARRAY = 2
_BPF_PROG_TYPE_SOCKET_FILTER = 1
_BPF_PSEUDO_MAP_FD = 1
SO_ATTACH_REUSEPORT_EBPF = 52


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def program(map_fd: int, n: int) -> bytes:
    """The eBPF instructions: ``counter++ % n`` (see the module's docstring)."""
    return b"".join(
        [
            _insn(0x62, dst=10, off=-4, imm=0),  # st [r10-4] = 0
            _insn(0x18, dst=1, src=_BPF_PSEUDO_MAP_FD, imm=map_fd),  # ld_imm64 r1 = map
            _insn(0),
            _insn(0xBF, dst=2, src=10),  # r2 = r10
            _insn(0x07, dst=2, imm=-4),  # r2 += -4
            _insn(0x85, imm=1),  # call bpf_map_lookup_elem
            _insn(0x15, dst=0, off=7, imm=0),  # if r0 == 0 goto zero
            _insn(0x61, dst=1, src=0),  # r1 = *(u32 *)(r0 + 0)
            _insn(0xBF, dst=2, src=1),  # r2 = r1
            _insn(0x04, dst=2, imm=1),  # w2 += 1
            _insn(0x63, dst=0, src=2),  # *(u32 *)(r0 + 0) = r2
            _insn(0xBF, dst=0, src=1),  # r0 = r1
            _insn(0x94, dst=0, imm=n),  # w0 %= n
            _insn(0x95),  # exit
            _insn(0xB7, dst=0, imm=0),  # zero: r0 = 0
            _insn(0x95),  # exit
        ]
    )


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"no bpf() syscall number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(number, cmd, attr, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def _load(n: int) -> int:
    """A loaded program dealing over ``n`` sockets: its fd (the caller closes it)."""
    attr = ctypes.create_string_buffer(struct.pack("<IIIII", _BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0), 128)
    map_fd = _bpf(_BPF_MAP_CREATE, attr)
    try:
        code = program(map_fd, n)
        insns = ctypes.create_string_buffer(code, len(code))
        license = ctypes.create_string_buffer(b"GPL")
        attr = ctypes.create_string_buffer(128)
        struct.pack_into(
            "<IIQQ",
            attr,
            0,
            _BPF_PROG_TYPE_SOCKET_FILTER,
            len(code) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(license),
        )
        return _bpf(_BPF_PROG_LOAD, attr)
    finally:
        os.close(map_fd)  # the program holds the map


def deal_in_turn(sock: socket.socket, n: int) -> str | None:
    """Make the SO_REUSEPORT group ``sock`` listens in deal new connections in turn over
    its first ``n`` sockets. None when done, else why not (the kernel's hash stays). The
    program stays with the group as long as any of its sockets does."""
    if n < 2:
        return "one socket: nothing to deal"
    if platform.system() != "Linux":
        return f"dealing in turn needs Linux's eBPF, not {platform.system()}'s"
    try:
        prog = _load(n)
    except OSError as err:
        return f"cannot load the eBPF program: {err.strerror}"
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, prog)
    except OSError as err:
        return f"cannot attach the eBPF program: {err.strerror}"
    finally:
        os.close(prog)
    return None


def listening_sockets(port: int) -> list[socket.socket]:
    """This process's listening TCP sockets on ``port`` (such as those a gRPC server made
    for itself), as sockets over duplicated fds: the caller closes them."""
    found = []
    seen = set()  # one socket may be behind several fds
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # no /proc (not Linux): none found, nothing dealt
        return []
    for name in names:
        try:
            fd = int(name)
            link = os.readlink(f"/proc/self/fd/{name}")
            if not link.startswith("socket:") or link in seen:
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
            listening = tcp and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if listening and sock.getsockname()[1] == port:
                found.append(sock)
                seen.add(link)
                continue
        except OSError:
            pass
        sock.close()
    return found


def deal_port_in_turn(port: int, n: int, *others: socket.socket) -> str | None:
    """:func:`deal_in_turn` for the groups of this process's listening sockets on ``port``
    (a gRPC server's) and of ``others``: None when each was dealt, else the first reason
    one was not."""
    socks = listening_sockets(port)
    try:
        return next((why for s in [*socks, *others] if (why := deal_in_turn(s, n))), None)
    finally:
        for s in socks:
            s.close()
