"""Logging set-up: readable lines, or one JSON object per line (``--log-format json``)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

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
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup(fmt: str = "text", level: str = "INFO", component: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"{component} " if component else ""
        formatter = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        formatter.converter = time.localtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own logger is chatty at INFO about channel state.
    logging.getLogger("grpc").setLevel(logging.WARNING)
