"""The states a scheduler and a replica can be in, as the head and the schedulers name them.

``StrEnum``: a state is its name on the wire (the protobuf ``ReplicaState`` enum carries
the same names) and in JSON (``shoal status --json``, ``/api/status``), so a state compares
equal to its string there; inside shoal, compare with the members.
"""

from __future__ import annotations

from enum import StrEnum


class SchedulerState(StrEnum):
    ALIVE = "ALIVE"  # registered, and its last health update is within dead_after_s
    DEAD = "DEAD"  # silent for dead_after_s; its replicas are placed elsewhere


class ReplicaState(StrEnum):
    PENDING = "PENDING"  # the head asked a scheduler for it; not yet confirmed (head only)
    DOWNLOADING = "DOWNLOADING"  # its scheduler fetches its model (a URI) into the cache; no process yet
    QUEUED = "QUEUED"  # waits for one of its scheduler's start slots (max_concurrent_starts); no process yet
    STARTING = "STARTING"  # its process runs, the model is loading
    READY = "READY"  # serving
    DRAINING = "DRAINING"  # finishing what it has; takes nothing new
    STOPPED = "STOPPED"  # exited when asked
    DEAD = "DEAD"  # exited on its own, or stopped answering pings

    @property
    def gone(self) -> bool:
        """Whether its process has ended (a scheduler reports it once, then forgets it)."""
        return self in (ReplicaState.STOPPED, ReplicaState.DEAD)
