"""A standby head's REST answer: 503 with where the leader is, for every route but
``/healthz`` (which says ``standby`` and names the leader, so a probe sees the process is up).

A plain ASGI wrapper around the head's app; it reads ``leadership`` on every request.
"""

from __future__ import annotations

import json
from typing import Any

from shoal.head.leader import Leadership, standby_error

Scope = dict[str, Any]


class StandbyApp:
    """``app`` while this head leads and has loaded its state (``leadership.serving``);
    otherwise a JSON answer naming the leader."""

    def __init__(self, app: Any, leadership: Leadership) -> None:
        self.app = app
        self.leadership = leadership

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.leadership.serving:
            await self.app(scope, receive, send)
            return
        leader = self.leadership.leader
        body: dict[str, Any] = {
            "leader": None if leader is None else {"grpc": leader.grpc, "http": leader.http},
        }
        if scope.get("path") == "/healthz":
            status = 200
            body["status"] = "standby"
        else:
            error = standby_error(self.leadership)
            status = error.http_status
            body["error"] = error.message
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status != 200:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
