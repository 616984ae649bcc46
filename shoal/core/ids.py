"""Request keys unique within a process, made cheaply: ``uuid.uuid4()`` per request was a
visible share of the ingress's own CPU (cProfile of the OIP gRPC path: urandom plus the
UUID object), and the router only needs keys no other in-flight request of this process
has."""

from __future__ import annotations

import itertools
import os

_PREFIX = os.urandom(2).hex()
_COUNTER = itertools.count()


def request_key() -> str:
    """12 hex digits, different from every other call's in this process until 2**32 calls
    have been made (then the counter wraps; the requests of that time are long answered).
    The random prefix differs between processes."""
    return f"{_PREFIX}{next(_COUNTER) & 0xFFFFFFFF:08x}"
