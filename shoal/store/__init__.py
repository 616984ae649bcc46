"""The state store: the :class:`Store` protocol and its implementations.

:class:`MemoryStore` keeps everything in a dict (tests); :class:`SqliteStore` is the
embedded durable default; :class:`shoal.store.etcd.EtcdStore` keeps the state on an etcd
cluster for standby heads (imported from its module, so that a head on SQLite does not load
the etcd client). See :mod:`shoal.store.base` for revisions and watch semantics.
"""

from shoal.store.base import (
    Batch,
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
    "Batch",
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
