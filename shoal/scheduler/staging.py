"""A replica whose process cannot start yet: the supervisor's process while its model
downloads, or while it waits for a start slot (``max_concurrent_starts``).

:class:`StagedProcess` is a :class:`shoal.scheduler.supervisor.Process` that, once started,
takes a lease on its URI from the artifact cache (when it has one), then has the supervisor
launch the real replica process (on the local copy) and stands in for it (pid, exit code,
signals). Before the
launch it runs without a pid (0); a signal then stops the wait, and it "exits" with minus
the signal's number; a failed download ends it with code 1, after telling ``failed`` why.
The lease is released once the launched process has exited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.core.tasks import TaskSet
from shoal.errors import ShoalError
from shoal.scheduler.artifacts import ArtifactCache, Lease

if TYPE_CHECKING:
    from shoal.scheduler.supervisor import Process

Launch = Callable[[Path | None, Path | None], Awaitable["Process | None"]]
"""``(local copy, its blob's folder)`` (None, None without a URI) -> the launched process,
or None when the replica is no longer wanted."""


class StagedProcess:
    def __init__(self, cache: ArtifactCache, uri: str) -> None:
        self.uri = uri
        self._cache = cache
        self._real: Process | None = None
        self._code: int | None = None
        self._settled = asyncio.Event()
        self._lease: Lease | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, tasks: TaskSet, launch: Launch, failed: Callable[[str], None]) -> None:
        """Begin the fetch (or the wait for ``launch``), as a task of ``tasks``."""
        self._task = tasks.spawn(self._run(launch, failed), "fetch-replica")

    async def _run(self, launch: Launch, failed: Callable[[str], None]) -> None:
        try:
            if self.uri:
                self._lease = await self._cache.acquire(self.uri)
            if self._code is None:
                lease = self._lease
                self._real = await (
                    launch(lease.path, lease.folder) if lease is not None else launch(None, None)
                )
        except ShoalError as err:
            failed(f"fetching the model failed: {err}")
            self._code = 1
        finally:
            if self._real is None:
                if self._code is None:
                    self._code = 1
                if self._lease is not None:
                    self._lease.release()
            self._settled.set()

    def describe(self) -> str:
        """What it waits for: the download's progress."""
        progress = self._cache.progress(self.uri)
        return progress.describe() if progress is not None else f"waiting for {self.uri}"

    @property
    def pid(self) -> int:
        return self._real.pid if self._real is not None else 0

    @property
    def status_known(self) -> bool:
        return self._real.status_known if self._real is not None else True

    @property
    def returncode(self) -> int | None:
        return self._real.returncode if self._real is not None else self._code

    async def wait(self) -> int:
        await self._settled.wait()
        if self._real is None:
            assert self._code is not None
            return self._code
        code = await self._real.wait()
        if self._lease is not None:
            self._lease.release()
        return code

    def send_signal(self, sig: int) -> None:
        if self._real is not None:
            self._real.send_signal(sig)
        elif self._code is None:
            self._code = -sig
            if self._task is not None:
                self._task.cancel()
            else:
                self._settled.set()
