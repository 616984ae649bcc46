"""The NFQUEUE delay loop: raw netlink, no library, run inside a namespace by
:meth:`shoal.testing.netns.Hosts.delay` as ``python -m shoal.testing.netns nfqueue``."""

from __future__ import annotations

import heapq
import os
import random
import select
import socket
import struct
import time
from collections.abc import Sequence

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
