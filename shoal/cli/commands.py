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

from shoal.cli.common import text_table, with_client
from shoal.config import Settings
from shoal.core.spec import DeploymentSpec
from shoal.errors import InvalidArgument, ShoalError, Unavailable


def cmd_scale(args: argparse.Namespace) -> int:
    if args.replicas < 0:
        raise InvalidArgument(f"replicas must be >= 0, got {args.replicas}")

    async def go(client: Any, settings: Settings) -> int:
        await client.scale(args.name, args.replicas)
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


def render_status(status: dict[str, Any]) -> str:
    """The human table of ``shoal status``."""
    out: list[str] = []

    def table(headers: list[str], rows: list[list[str]]) -> None:
        out.append(text_table(headers, rows))

    table(
        ["SCHEDULER", "STATE", "ADDRESS", "PID", "CPUS", "MEMORY_MB", "GPUS", "LAST SEEN"],
        [
            [
                s["id"],
                s["state"],
                s["address"],
                str(s["pid"]),
                f"{s['allocated']['cpus']:g}/{s['capacity']['cpus']:g}",
                f"{s['allocated']['memory_mb']:.0f}/{s['capacity']['memory_mb']:.0f}",
                f"{s['allocated']['gpus']:g}/{s['capacity']['gpus']:g}",
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
        ["REPLICA", "DEPLOYMENT", "STATE", "SCHEDULER", "PID", "ADDRESS", "IN FLIGHT"],
        [
            [
                r["id"],
                d["name"],
                r["state"],
                r["scheduler"],
                str(r["pid"]),
                r["address"] or "-",
                str(r["in_flight"]),
            ]
            for d in status["deployments"]
            for r in d["replicas"]
        ],
    )
    return "\n".join(out)


def _parse_inputs(text: str, spec: DeploymentSpec | None) -> dict[str, np.ndarray]:
    """JSON mapping input names to nested lists -> arrays, typed by the spec's declared inputs."""
    from shoal.core import tensors

    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as err:
            raise InvalidArgument(f"cannot read {text[1:]}: {err.strerror}") from None
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise InvalidArgument(f"--data is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or not doc:
        raise InvalidArgument(
            '--data must be a JSON object mapping input names to lists, e.g. {"x": [[1, 2]]}'
        )
    declared = {t.name: t.datatype for t in (spec.inputs if spec else ())}
    out = {}
    for name, value in doc.items():
        arr = np.asarray(value)
        if arr.dtype == object:
            raise InvalidArgument(
                f"input {name!r}: ragged nested lists (every row must have the same length)"
            )
        datatype = declared.get(name)
        if datatype is None:
            if arr.dtype.kind in "iuf":
                datatype = "FP32"
            elif arr.dtype.kind == "b":
                datatype = "BOOL"
            else:
                datatype = "BYTES"
        out[name] = tensors.from_json(datatype, list(arr.shape), arr.tolist(), name=name)
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from shoal.core.spec import parse_spec
    from shoal.rpc.clients import send_request

    async def go(client: Any, settings: Settings) -> int:
        status = (await client.status()).to_json()
        dep = next((d for d in status["deployments"] if d["name"] == args.name), None)
        if dep is None:
            raise ShoalError(f"no deployment named {args.name!r}")
        spec = parse_spec(dep["spec"])
        address = args.scheduler
        if not address:
            alive = [s for s in status["schedulers"] if s["state"] == "ALIVE"]
            if not alive:
                raise Unavailable("no live scheduler to send the request to")
            address = alive[0]["address"]
        inputs = _parse_inputs(args.data, spec)
        outputs, replica = await send_request(address, args.name, inputs, settings, timeout_s=args.timeout)
        print(json.dumps({name: _to_list(arr) for name, arr in outputs.items()}))
        if args.verbose:
            print(f"answered by replica {replica}", file=sys.stderr)
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
