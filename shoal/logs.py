"""Logging set-up: readable lines, or one JSON object per line (``--log-format json``), on
stderr and, for ``shoal up``, ``head`` and ``scheduler``, also in a file of the state folder
that the process and its ingress workers append to together (:class:`SharedFileHandler`)."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import sys
import time
import traceback
from typing import Any

# The data plane makes every request's id unique by adding "~" and 12 hex digits to the
# client's (shoal.scheduler.dataplane); logs carry the client's id, which users search by.
_UNIQUE_SUFFIX = re.compile(r"~[0-9a-f]{12}$")


def client_request_id(request_id: str) -> str:
    """The id the client sent, without the suffix that made it unique inside shoal."""
    return _UNIQUE_SUFFIX.sub("", request_id)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "replica_id", "deployment"):
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = value
        unique = doc.get("request_id")
        if isinstance(unique, str):
            doc["request_id"] = client_request_id(unique)
            if unique != doc["request_id"]:
                doc["request_key"] = unique
        if record.exc_info:
            doc["exc"] = _format_exception(record.exc_info, escape=False)
        return json.dumps(doc)


# What a text line may not carry raw: the C0 control characters but tab, DEL, the C1
# control characters, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escaped(text: str) -> str:
    """``text`` with its control characters written escaped (``\\n``, ``\\x1b``, ``\\u2028``),
    as a text log line writes a message: one line, nothing a terminal acts on."""
    return _CONTROL.sub(_escape, text) if _CONTROL.search(text) else text


EXCEPTION_TEXT_CHARS = 2000
"""How much of each exception's own text (``ValueError: ...``) a traceback in the log quotes."""


def _format_exception(ei: Any, *, escape: bool) -> str:
    """A traceback as ``logging`` writes it, but each exception's own text (the last line of
    each in the chain: its message, which a model often builds from a client's input) cut to
    :data:`EXCEPTION_TEXT_CHARS` and, when ``escape``, its control characters escaped: a
    model's ``ValueError(f"bad input {text!s}")`` wrote a client's newlines and escape
    sequences into the log raw, and a 2 MB input 2 MB a request."""
    exc_type, value, tb = ei
    top = traceback.TracebackException(exc_type, value, tb)
    seen: set[int] = set()
    todo = [top]
    while todo:
        te = todo.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        te.format_exception_only = _cleaned(te.format_exception_only, escape)  # type: ignore[method-assign]
        todo += [t for t in (te.__cause__, te.__context__) if t is not None]
        todo += getattr(te, "exceptions", None) or []
    return "".join(top.format()).rstrip("\n")


def _cleaned(lines: Any, escape: bool) -> Any:
    def cleaned() -> Any:
        for line in lines():
            body = line[:-1] if line.endswith("\n") else line
            if len(body) > EXCEPTION_TEXT_CHARS:
                more = len(body) - EXCEPTION_TEXT_CHARS
                body = f"{body[:EXCEPTION_TEXT_CHARS]}... ({more} more characters)"
            yield (_CONTROL.sub(_escape, body) if escape else body) + "\n"

    return cleaned


class TextFormatter(logging.Formatter):
    """One record, one line: a message's control characters are written escaped (``\\n``,
    ``\\x1b``). Request ids and model names come from clients, and a newline in one
    used to start a line of the client's making in the log (``... ERROR shoal.head: ...``),
    an escape sequence to reach the terminal of whoever read it. A traceback, added after
    the message, keeps its lines; each exception's own text in it is escaped and cut to
    :data:`EXCEPTION_TEXT_CHARS` the same way."""

    def formatException(self, ei: Any) -> str:
        return _format_exception(ei, escape=True)

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        if not _CONTROL.search(message):
            return super().formatMessage(record)
        record.message = _CONTROL.sub(_escape, message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


def setup(fmt: str = "text", level: str = "INFO", component: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"{component} " if component else ""
        formatter = TextFormatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        formatter.converter = time.localtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own logger is chatty at INFO about channel state.
    logging.getLogger("grpc").setLevel(logging.WARNING)


FILE_MAX_BYTES = 10 * 1024 * 1024
FILE_BACKUPS = 2


class SharedFileHandler(logging.Handler):
    """Log lines appended to ``path``, by this process and others that write the same file
    (a scheduler and its ingress workers: ``<state>/logs/up.log``).

    Each record is one ``write`` on a descriptor opened ``O_APPEND``, so the lines of several
    processes never mix within a line. Past ``max_bytes`` the file is rotated (``path.1``,
    ``path.2``, ... up to ``backups``) by whichever process finds it full, under an
    exclusive ``flock`` of the file itself: a process that waited for it finds the file
    already rotated and only opens the new one. A process whose file was rotated (or
    removed) by another opens ``path`` again before its next line; so does one whose
    handler was closed (``logging.config.dictConfig``, which uvicorn calls, closes every
    handler), as ``logging.FileHandler`` does.
    """

    def __init__(
        self, path: str | os.PathLike[str], max_bytes: int = FILE_MAX_BYTES, backups: int = FILE_BACKUPS
    ) -> None:
        super().__init__()
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: io.FileIO | None = self._open()

    def _open(self) -> io.FileIO:
        # Unbuffered: each write is one system call, appended at the file's end.
        return open(self.path, "ab", buffering=0)

    def _is_current(self, file: io.FileIO) -> bool:
        """Whether ``path`` still names ``file`` (not rotated, not removed)."""
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(file.fileno())
        return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)

    def _full(self, file: io.FileIO, adding: int) -> bool:
        size = os.fstat(file.fileno()).st_size
        return self.max_bytes > 0 and size > 0 and size + adding > self.max_bytes

    def _rotate(self, file: io.FileIO, adding: int) -> None:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        try:
            # Another process may have rotated it while this one waited for the lock.
            if self._is_current(file) and self._full(file, adding):
                if self.backups > 0:
                    for i in range(self.backups - 1, 0, -1):
                        older = f"{self.path}.{i}"
                        if os.path.exists(older):
                            os.replace(older, f"{self.path}.{i + 1}")
                    os.replace(self.path, f"{self.path}.1")
                else:
                    os.unlink(self.path)
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)

    def _current(self, adding: int) -> io.FileIO:
        """The file to append ``adding`` bytes to: ``path`` as it is now, rotated first if full."""
        file = self._file
        if file is not None and not self._is_current(file):
            file.close()
            file = self._file = None
        if file is not None and self._full(file, adding):
            self._rotate(file, adding)
            file.close()
            file = self._file = None
        if file is None:
            file = self._file = self._open()
        return file

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            file = self._current(len(data))
            view = memoryview(data)
            while view:  # a regular file takes it whole, but for a full disk
                written = file.write(view)
                if not written:
                    raise OSError(f"nothing written to {self.path}")
                view = view[written:]
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
        finally:
            self.release()
        super().close()


def copy_to_file(path: str | os.PathLike[str]) -> SharedFileHandler:
    """Also write what this process logs to ``path`` (rotated: :class:`SharedFileHandler`),
    formatted as on stderr: call after :func:`setup`. Other processes may write it too."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = SharedFileHandler(path)
    root = logging.getLogger()
    if root.handlers:
        handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)
    return handler


def file_copy() -> str | None:
    """The file this process copies its log to (:func:`copy_to_file`); None without one. Its
    ingress workers copy theirs to the same file."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, SharedFileHandler):
            return handler.path
    return None
