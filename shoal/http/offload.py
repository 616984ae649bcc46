"""The parsing process: where a scheduler's HTTP doors parse large JSON bodies and write
large JSON answers, off the event loop.

json.loads and json.dumps hold the GIL for their whole run, so a thread would not help: a
49 MB infer body parsed on the event loop held every other request up for seconds. One
process (spawned on first use, stopped by :func:`shutdown_parser` at exit) takes at most
:data:`MAX_LARGE_JSON` bodies at once; past that a large body is RESOURCE_EXHAUSTED / 503.
Users: REST infer (:mod:`shoal.http.infer`), the OpenAI API and the generate extension
(:mod:`shoal.http.jsonbody`).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import multiprocessing
from collections.abc import Callable
from typing import Any, TypeVar

from shoal.errors import ResourceExhausted

T = TypeVar("T")

#: Large bodies being parsed or answers written in the parsing process at once, each up to
#: max_message_mb in memory; past it a large JSON request is RESOURCE_EXHAUSTED / 503.
MAX_LARGE_JSON = 4
_large_json = 0
_parser: concurrent.futures.ProcessPoolExecutor | None = None


def _new_parser() -> concurrent.futures.ProcessPoolExecutor:
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    atexit.register(shutdown_parser)  # stopped before the interpreter tears its modules down
    return pool


async def in_parser(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the parsing process (``fn`` and its arguments picklable)."""
    global _parser, _large_json
    if _large_json >= MAX_LARGE_JSON:
        raise ResourceExhausted(
            f"{_large_json} large JSON bodies are being handled already; retry, or send tensors as "
            "binary data (Triton's binary tensor data extension) or over gRPC"
        )
    if _parser is None:
        _parser = _new_parser()
    _large_json += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(_parser, fn, *args)
    finally:
        _large_json -= 1


def shutdown_parser() -> None:
    """Stop the process that parses big bodies, if one was started (at scheduler exit)."""
    global _parser
    if _parser is not None:
        _parser.shutdown(wait=True, cancel_futures=True)
        _parser = None
