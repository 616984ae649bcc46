"""Whether a given process (not a later one given its number) still runs."""

from __future__ import annotations

from collections.abc import Callable

import psutil


def process_runs(pid: int) -> Callable[[], bool] | None:
    """Whether process ``pid`` (the one running now, not a later one given its number) still
    runs; None when ``pid`` is 0 or already gone."""
    try:
        started = psutil.Process(pid).create_time() if pid > 0 else None
    except psutil.Error:
        started = None
    if started is None:
        return None

    def runs() -> bool:
        try:
            proc = psutil.Process(pid)
            return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    return runs
