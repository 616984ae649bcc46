"""A role's certificate files, taken again when they change on disk (a certificate renewed
by cert-manager, or by ``shoal certs renew``), without a restart.

One :class:`CertWatch` per certificate folder and role in a process (:func:`watch`), shared
by every server and channel of that role: the gRPC servers ask it on each new handshake
(``shoal.rpc.tls.server_credentials``), the HTTPS servers on each new connection
(``shoal.http.server``), the channels to peers before their calls
(``shoal.rpc.channels.PeerChannel``, which make a new channel when the files change), and the
``/metrics`` pages as they are scraped (the expiry gauge). :meth:`CertWatch.poll` costs a
clock read and a comparison, except at most once every ``every_s`` (1 s), when it also
``stat``s the three files; only files whose inode, size, modification or change time
moved are read, and then checked as at start (:func:`shoal.certs.check`): files that fail
(a key that is not the certificate's, an expired certificate, a file read while a copy
wrote it) are not taken, the ones read before keep serving, and a WARNING names the file
and what is wrong with it (once per problem: files that stay bad are checked again each
minute, quietly, so that a certificate valid from a later time is taken when it starts).
The certificate taken is logged at INFO once, with its end.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shoal import certs
from shoal.errors import InvalidArgument

log = logging.getLogger("shoal")

POLL_EVERY_S = 1.0
"""At most one look at the files (three ``stat`` calls) per this many seconds."""
RETRY_BAD_S = 60.0
"""Files that failed their check are checked again after this long even when unchanged."""

_Stamp = tuple[tuple[int, int, int, int, int] | None, ...]


@dataclass(frozen=True)
class Material:
    """What a role serves with: PEM bytes that passed :func:`shoal.certs.check`."""

    ca: bytes
    cert: bytes
    key: bytes
    end: datetime.datetime
    """When the certificate or the CA runs out, whichever comes first."""
    serial: int
    generation: int
    """0 for the files read at start, one more for each set taken since."""


class CertWatch:
    """``role``'s files in ``tls_dir``, re-read when they change. Safe to call from any
    thread (gRPC asks from its own); :meth:`poll` never blocks on another caller's reading."""

    def __init__(
        self,
        files: certs.Files,
        role: str,
        first: Material,
        stamp: _Stamp,
        *,
        every_s: float = POLL_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.files = files
        self.role = role
        self.current = first
        self.every_s = every_s
        self.looks = 0
        """How many times the files were stat-ed (the measure of what handshakes cost)."""
        self._clock = clock
        self._stamp = stamp  # of the files last read, taken or not
        self._bad: str | None = None  # what was wrong with them, when not taken
        self._next = clock() + every_s
        self._retry = 0.0
        self._lock = threading.Lock()

    def poll(self) -> Material:
        """The files to serve with now: those read last that passed their check."""
        now = self._clock()
        if now < self._next or not self._lock.acquire(blocking=False):
            return self.current
        try:
            if now >= self._next:
                self._next = now + self.every_s
                self._look(now)
        finally:
            self._lock.release()
        return self.current

    def _look(self, now: float) -> None:
        self.looks += 1
        stamp = _stamp(self.files)
        if stamp == self._stamp and (self._bad is None or now < self._retry):
            return
        try:
            f = certs.files(self.files.ca.parent, self.role)
            ca, cert, key = (p.read_bytes() for p in (f.ca, f.cert, f.key))
        except (InvalidArgument, OSError) as err:
            self._refuse(stamp, now, str(err) if isinstance(err, InvalidArgument) else _os_error(err))
            return
        if _stamp(self.files) != stamp:
            return  # written to as it was read: look again next time
        try:
            # Renewed files that fail: the running certificate still serves, so the remedy is
            # to renew (or copy) again, not to remake the cluster's CA.
            end, parsed = certs.check_pem(
                self.files,
                ca,
                cert,
                key,
                remake=f"renew them with 'shoal certs renew {self.files.ca.parent}', or copy good ones",
            )
        except InvalidArgument as err:
            self._refuse(stamp, now, str(err))
            return
        self._stamp, self._bad = stamp, None
        old = self.current
        if (ca, cert, key) == (old.ca, old.cert, old.key):
            return  # touched, or copied again as they were
        self.current = Material(ca, cert, key, end, parsed.serial_number, old.generation + 1)
        log.info(
            "took the renewed %s certificate in %s for new connections: serial %x, valid until "
            "%s UTC (the one before: until %s UTC)",
            self.role,
            self.files.ca.parent,
            parsed.serial_number,
            f"{end:%Y-%m-%d %H:%M}",
            f"{old.end:%Y-%m-%d %H:%M}",
        )

    def _refuse(self, stamp: _Stamp, now: float, problem: str) -> None:
        self._stamp, self._retry = stamp, now + RETRY_BAD_S
        if problem != self._bad:
            log.warning(
                "the %s certificate files in %s changed but are not taken: %s; still serving the "
                "certificate read before (valid until %s UTC) until they pass",
                self.role,
                self.files.ca.parent,
                problem,
                f"{self.current.end:%Y-%m-%d %H:%M}",
            )
        self._bad = problem


def _os_error(err: OSError) -> str:
    return f"cannot read {err.filename}: {err.strerror}" if err.filename else str(err)


def _stamp(f: certs.Files) -> _Stamp:
    out: list[tuple[int, int, int, int, int] | None] = []
    for path in (f.ca, f.cert, f.key):
        try:
            st = os.stat(path)  # through links: a Kubernetes secret's files are links that move
        except OSError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev))
    return tuple(out)


def load(
    tls_dir: str | Path,
    role: str,
    *,
    every_s: float = POLL_EVERY_S,
    clock: Callable[[], float] = time.monotonic,
) -> CertWatch:
    """A new watch of ``role``'s files, read and checked now (raises InvalidArgument as
    :func:`shoal.certs.check` does). Most callers want :func:`watch`."""
    f = certs.files(tls_dir, role)
    stamp = _stamp(f)
    try:
        ca, cert, key = (p.read_bytes() for p in (f.ca, f.cert, f.key))
    except OSError as err:
        raise InvalidArgument(_os_error(err)) from None
    end, parsed = certs.check_pem(f, ca, cert, key)
    first = Material(ca, cert, key, end, parsed.serial_number, 0)
    return CertWatch(f, role, first, stamp, every_s=every_s, clock=clock)


_watches: dict[tuple[str, str], CertWatch] = {}
_watches_lock = threading.Lock()


def watch(tls_dir: str | Path, role: str) -> CertWatch:
    """This process's watch of ``role``'s files in ``tls_dir`` (made, and the files checked,
    on the first call; InvalidArgument then as :func:`shoal.certs.check`)."""
    key = (os.path.abspath(tls_dir), role)
    with _watches_lock:
        found = _watches.get(key)
        if found is None:
            found = _watches[key] = load(tls_dir, role)
        return found
