"""Whether a given process (not a later one given its number) still runs."""

from __future__ import annotations

from collections.abc import Callable

import psutil


def process_runs(pid: int) -> Callable[[], bool] | None:
    """Whether process ``pid`` (the one running now, not a later one given its number) still
    runs; None when ``pid`` is 0 or cannot be looked at (not known).

    A process already gone when it is first looked at does not run: before, that too was
    "not known", and an ingress worker whose main process was killed while the worker was
    still starting (seen under CPU load, 1 in 10) ignored its loss until ``orphan_after_s``,
    holding the shared ports against the scheduler started again on them."""
    if pid <= 0:
        return None
    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return _gone
    except psutil.Error:
        return None

    def runs() -> bool:
        try:
            proc = psutil.Process(pid)
            return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    return runs


def _gone() -> bool:
    return False
