"""The client commands that are one call each: ``scale``, ``delete``, ``status``, ``predict``,
``certs``, ``token``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from shoal.cli.common import INT32_MAX, in_range, text_table, with_client
from shoal.config import Settings
from shoal.core import yamldoc
from shoal.core.spec import MAX_REPLICAS
from shoal.errors import InvalidArgument


def cmd_scale(args: argparse.Namespace) -> int:
    in_range("replicas", args.replicas, INT32_MAX)
    if args.if_revision is not None:
        in_range("--if-revision", args.if_revision, INT32_MAX)
    if args.if_replicas is not None:
        in_range("--if-replicas", args.if_replicas, MAX_REPLICAS)

    async def go(client: Any, settings: Settings) -> int:
        await client.scale(
            args.name, args.replicas, if_revision=args.if_revision, if_replicas=args.if_replicas
        )
        print(f"deployment {args.name} scaled to {args.replicas}")
        return 0

    return with_client(args, go)


def cmd_delete(args: argparse.Namespace) -> int:
    async def go(client: Any, settings: Settings) -> int:
        await client.delete(args.name)
        print(f"deployment {args.name} deleted")
        return 0

    return with_client(args, go)


def cmd_status(args: argparse.Namespace) -> int:

    async def go(client: Any, settings: Settings) -> int:
        status = (await client.status()).to_json()
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            print(render_status(status))
        return 0

    return with_client(args, go)


#: How many of the cluster's latest events ``shoal status`` shows under its tables.
STATUS_EVENTS = 10


def render_status(status: dict[str, Any]) -> str:
    """The human table of ``shoal status``; under it the cluster's latest events (a replica
    that died, and why: a replacement's row alone does not say; ``--json`` has the 50 the
    head answers)."""
    out: list[str] = []

    def table(headers: list[str], rows: list[list[str]]) -> None:
        out.append(text_table(headers, rows))

    table(
        ["SCHEDULER", "STATE", "ADDRESS", "PID", "CPUS", "MEMORY_MB", "GPUS", "REPLICAS", "LAST SEEN"],
        [
            [
                s["id"],
                s["state"] + (" (tables late)" if s.get("routes_lagging") else ""),
                s["address"],
                str(s["pid"]),
                f"{s['allocated']['cpus']:g}/{s['capacity']['cpus']:g}",
                f"{s['allocated']['memory_mb']:.0f}/{s['capacity']['memory_mb']:.0f}",
                f"{s['allocated']['gpus']:g}/{s['capacity']['gpus']:g}",
                f"{s.get('replicas', 0)}/{s.get('max_replicas') or '-'}",
                f"{s['last_seen_s']:.1f}s ago",
            ]
            for s in status["schedulers"]
        ],
    )
    out.append("")
    table(
        ["DEPLOYMENT", "READY", "BACKEND", "MODEL", "PENDING"],
        [
            [
                d["name"],
                f"{sum(1 for r in d['replicas'] if r['state'] == 'READY')}/{d['target_replicas']}",
                d["spec"].get("backend", ""),
                d["spec"].get("model", ""),
                d["pending_reason"] or "-",
            ]
            for d in status["deployments"]
        ],
    )
    out.append("")
    table(
        ["REPLICA", "DEPLOYMENT", "REVISION", "STATE", "SCHEDULER", "PID", "ADDRESS", "IN FLIGHT"],
        [
            [
                r["id"],
                d["name"],
                str(r.get("revision") or "-"),
                # A replica waiting for its model shows the download's progress; one waiting
                # for a start slot, how many are ahead of it.
                f"{r['state']} ({r['message']})"
                if r["state"] in ("DOWNLOADING", "QUEUED") and r.get("message")
                else r["state"],
                r["scheduler"],
                str(r["pid"]),
                r["address"] or "-",
                str(r["in_flight"]),
            ]
            for d in status["deployments"]
            for r in d["replicas"]
        ],
    )
    events = status.get("events") or []
    if events:
        out.append("")
        table(
            ["EVENT TIME", "KIND", "MESSAGE"],
            [
                [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"])), e["kind"], e["message"]]
                for e in events[-STATUS_EVENTS:]
            ],
        )
    return "\n".join(out)


def _parse_inputs(text: str, most: int) -> dict[str, Any]:
    """``--data``: a JSON object (or ``@file``, of at most ``most`` bytes) mapping input names
    to nested lists; the API types them (``shoal.api.to_arrays``). Before, the file was read
    whole and as it came: ``@/dev/zero`` took memory until the machine had none, and a file
    that is not UTF-8 was a UnicodeDecodeError traceback."""
    if text.startswith("@"):
        text = yamldoc.read_text(Path(text[1:]), "--data file", most=most)
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as err:  # ValueError: JSONDecodeError, an int of 4,300+ digits
        # The digits' ValueError ends in advice to the programmer (sys.set_int_max_str_digits).
        raise InvalidArgument(f"--data is not valid JSON: {str(err).split('; use sys.')[0]}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(
            '--data must be a JSON object mapping input names to lists, e.g. {"x": [[1, 2]]}'
        )
    return doc


def cmd_predict(args: argparse.Namespace) -> int:
    async def go(client: Any, settings: Settings) -> int:
        # JSON takes about 2.5 characters for each byte of a tensor: room for the largest request.
        inputs = _parse_inputs(args.data, most=4 * settings.max_message_bytes)
        handle = client.handle(args.name, scheduler=args.scheduler or "")
        reply = await handle.request(inputs, timeout_s=args.timeout)
        print(json.dumps({name: _to_list(arr) for name, arr in reply.outputs.items()}))
        if args.verbose:
            print(f"answered by replica {reply.replica_id}", file=sys.stderr)
        return 0

    return with_client(args, go)


def _to_list(arr: np.ndarray) -> Any:
    if arr.dtype == object:
        return np.vectorize(
            lambda v: v.decode(errors="replace") if isinstance(v, bytes) else v, otypes=[object]
        )(arr).tolist()
    return arr.tolist()


# ---------------------------------------------------------------- security


def cmd_certs_init(args: argparse.Namespace) -> int:
    from shoal import certs

    written = certs.init(args.dir, tuple(args.hosts), force=args.force)
    print(f"wrote {len(written)} files to {args.dir}: {', '.join(p.name for p in written)}")
    print(
        f"start every component with --tls-dir {args.dir} (or SHOAL_TLS_DIR); a machine needs ca.crt and "
        "the pairs of the roles it runs. Keep ca.key off the cluster's machines."
    )
    return 0


def cmd_certs_renew(args: argparse.Namespace) -> int:
    from shoal import certs
    from shoal.errors import InvalidArgument

    if not args.days > 0:
        raise InvalidArgument(f"--days must be above 0, not {args.days}")
    roles = tuple(dict.fromkeys(args.roles)) or certs.ROLES
    written = certs.renew(args.dir, roles, days=args.days, hosts=tuple(args.hosts))
    end = certs.check(args.dir, roles[0])
    names = ", ".join(p.name for p in written)
    print(f"renewed {names} in {args.dir} (keys unchanged), valid until {end:%Y-%m-%d %H:%M} UTC")
    print(
        "components running with this folder take them for new connections within a second, "
        "without a restart; copy them to the other machines' folders the same way (rename into place)"
    )
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    async def go(client: Any, settings: Settings) -> int:
        reply = await client.create_token(args.role, args.name)
        print(reply.token)
        print(
            f"token {reply.name} (role {reply.role}) created; it is shown this once. "
            "Send it as SHOAL_TOKEN / --token, or as 'Authorization: Bearer <token>'",
            file=sys.stderr,
        )
        return 0

    return with_client(args, go)


def cmd_token_list(args: argparse.Namespace) -> int:
    async def go(client: Any, settings: Settings) -> int:
        tokens = await client.list_tokens()
        width = max([4, *(len(t.name) for t in tokens)])
        print(f"{'NAME'.ljust(width)}  {'ROLE'.ljust(6)}  CREATED")
        for t in tokens:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.created))
            print(f"{t.name.ljust(width)}  {t.role.ljust(6)}  {created}")
        return 0

    return with_client(args, go)


def cmd_token_revoke(args: argparse.Namespace) -> int:
    async def go(client: Any, settings: Settings) -> int:
        await client.revoke_token(args.name)
        print(f"token {args.name} revoked")
        return 0

    return with_client(args, go)
