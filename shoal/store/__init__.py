"""The state store: the :class:`Store` protocol and its implementations.

:class:`MemoryStore` keeps everything in a dict (tests); :class:`SqliteStore` is the
embedded durable default. See :mod:`shoal.store.base` for revisions and watch semantics.
"""

from shoal.store.base import (
    BufferedWatch,
    Entry,
    Event,
    Store,
    StoreError,
    Watch,
    WatchHub,
    WatchLost,
)
from shoal.store.memory import MemoryStore
from shoal.store.sqlite import SqliteStore

__all__ = [
    "BufferedWatch",
    "Entry",
    "Event",
    "MemoryStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "Watch",
    "WatchHub",
    "WatchLost",
]
