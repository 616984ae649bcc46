"""The ``shoal`` command.

Cluster processes: ``up`` (head + one scheduler), ``head``, ``scheduler``.
Client commands talk to the head named by ``--head`` or ``SHOAL_HEAD``:
``deploy``, ``scale``, ``delete``, ``status``, ``predict``. Errors are one line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shoal import aio, logs
from shoal.config import Settings
from shoal.core.spec import DeploymentSpec, load_spec_file
from shoal.errors import InvalidArgument, ShoalError, Unavailable

EXIT_ERROR = 1
EXIT_USAGE = 2


# ---------------------------------------------------------------- settings


def _settings(args: argparse.Namespace, **flags: Any) -> Settings:
    common = {
        "head_address": getattr(args, "head", None),
        "tls_dir": getattr(args, "tls_dir", None),
        "token": getattr(args, "token", None),
    }
    return Settings.load(file=getattr(args, "config", None), flags={**common, **flags})


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-dir", help="the cluster's certificate folder (default $SHOAL_TLS_DIR)")
    p.add_argument("--token", help="bearer token for the head and for inference (default $SHOAL_TOKEN)")


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", help="state folder (SQLite store, logs); default ./.shoal")
    p.add_argument("--config", help="YAML settings file")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--advertise-host", help="address other machines use to reach this one")
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--log-level")
    p.add_argument("--grace", type=float, help="seconds replicas may take to drain on shutdown")
    p.add_argument("--tls-dir", help="certificate folder (shoal certs init): mutual TLS, HTTPS")
    p.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="allow a non-loopback --host without TLS (plaintext: a trusted network only)",
    )
    p.add_argument(
        "--allow-model-dir",
        action="append",
        dest="allowed_model_dirs",
        metavar="DIR",
        help="model code and files may come only from here (repeatable; default: anywhere)",
    )


def _cluster_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "state_dir": args.state,
        "host": args.host,
        "advertise_host": args.advertise_host,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "shutdown_grace_s": args.grace,
        "insecure": args.insecure,
        "allowed_model_dirs": args.allowed_model_dirs,
    }


def _add_scheduler_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grpc-port", type=int, help="gRPC ingress port (default 8001)")
    p.add_argument("--http-port", type=int, help="HTTP ingress port (default 8000)")
    p.add_argument("--cpus", type=float, help="CPUs offered to replicas (default: the machine's)")
    p.add_argument("--memory-mb", type=float, help="memory offered to replicas (default: the machine's)")
    p.add_argument("--gpus", type=float, help="GPUs offered to replicas (default: counted)")
    p.add_argument("--scheduler-id", help="stable id for this scheduler (default: generated)")


def _scheduler_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "grpc_port": args.grpc_port,
        "http_port": args.http_port,
        "cpus": args.cpus,
        "memory_mb": args.memory_mb,
        "gpus": args.gpus,
        "scheduler_id": args.scheduler_id,
    }


# ---------------------------------------------------------------- processes


def cmd_up(args: argparse.Namespace) -> int:
    from shoal.run import run_up

    settings = _settings(
        args,
        **_cluster_flags(args),
        **_scheduler_flags(args),
        head_port=args.head_port,
        head_http_port=args.dashboard_port,
    )
    specs = [s for f in args.deploy for s in load_spec_file(f)]
    logs.setup(settings.log_format, settings.log_level)

    async def on_ready(head: Any, scheduler: Any, tasks: Any) -> None:
        for spec in specs:
            result = await head.apply(spec)
            print(f"deployment {spec.name} {'created' if result.created else 'updated'}", flush=True)
        if specs:
            tasks.spawn(_up_progress(head, [s.name for s in specs]), "progress")
        endpoints = json.loads((Path(settings.state_dir) / "endpoints.json").read_text())
        web = "https" if settings.tls_dir else "http"
        print(
            "\nshoal is up\n"
            f"  head (SHOAL_HEAD):   {endpoints['head']}\n"
            f"  dashboard, REST API: {web}://{endpoints['head_http']}/\n"
            f"  inference gRPC:      {endpoints['scheduler']}\n"
            f"  inference HTTP:      {web}://{endpoints['scheduler_http']}/v2\n"
            f"  replica logs:        {Path(settings.state_dir) / 'logs'}/replica_<id>.log\n"
            f"  try:                 shoal status\n"
            "Ctrl-C stops the cluster and every replica.\n",
            flush=True,
        )

    aio.run(run_up(settings, on_ready), settings.event_loop)
    return 0


def cmd_head(args: argparse.Namespace) -> int:
    from shoal.run import run_head

    settings = _settings(args, **_cluster_flags(args), head_port=args.port, head_http_port=args.http_port)
    logs.setup(settings.log_format, settings.log_level, component="head")
    aio.run(run_head(settings), settings.event_loop)
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    from shoal.run import run_scheduler

    settings = _settings(args, **_cluster_flags(args), **_scheduler_flags(args))
    logs.setup(settings.log_format, settings.log_level, component="scheduler")
    aio.run(run_scheduler(settings), settings.event_loop)
    return 0


# ---------------------------------------------------------------- clients


def _with_client(args: argparse.Namespace, fn: Callable[[Any, Settings], Awaitable[int]]) -> int:
    from shoal.rpc.clients import ControlClient

    settings = _settings(args)

    async def go() -> int:
        client = ControlClient(settings.head_address, settings)
        try:
            return await fn(client, settings)
        except Unavailable as err:
            tls = "" if settings.tls_dir else " If the cluster runs with TLS, give --tls-dir (SHOAL_TLS_DIR)."
            raise Unavailable(
                f"cannot reach the head at {settings.head_address} ({err}); is it running? "
                f"Start one with 'shoal up' or point --head / SHOAL_HEAD at it.{tls}"
            ) from None
        finally:
            await client.close()

    return asyncio.run(go())


def cmd_deploy(args: argparse.Namespace) -> int:
    specs = [s for f in args.files for s in load_spec_file(f)]

    async def go(client: Any, settings: Settings) -> int:
        for spec in specs:
            reply = await client.apply(spec)
            verb = "created" if reply.created else ("updated" if reply.changed else "unchanged")
            print(f"deployment {spec.name} {verb}", flush=True)
        if args.wait:
            return await _wait_ready(client, [s.name for s in specs], args.timeout)
        return 0

    return _with_client(args, go)


def _progress(status: dict[str, Any], names: Sequence[str]) -> tuple[str, bool]:
    """One line of readiness for the named deployments, and whether all are ready."""
    lines = []
    done = True
    for dep in status["deployments"]:
        if dep["name"] not in names:
            continue
        ready = sum(1 for r in dep["replicas"] if r["state"] == "READY")
        target = dep["target_replicas"]
        done = done and ready >= target and len(dep["replicas"]) == target
        why = f" ({dep['pending_reason']})" if dep["pending_reason"] else ""
        lines.append(f"{dep['name']} {ready}/{target} ready{why}")
    return ", ".join(lines), done


def _show(line: str) -> None:
    # One line redrawn in a terminal; one line per change in a log.
    if sys.stdout.isatty():
        print(f"\r{line}\033[K", end="", flush=True)
    else:
        print(line, flush=True)


async def _up_progress(head: Any, names: Sequence[str], timeout_s: float = 300.0) -> None:
    """``shoal up``: show the example deployments coming up, then one summary line."""
    from shoal.head.node import cluster_status

    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout_s:
        async with head.lock:
            line, done = _progress(cluster_status(head), names)
        if line != last:
            _show(line)
            last = line
        if done:
            if sys.stdout.isatty():
                print()
            print(f"all deployments ready after {time.monotonic() - start:.1f}s: {line}", flush=True)
            return
        await asyncio.sleep(0.25)
    print(f"\nnot ready after {timeout_s:g}s: {last} (see shoal status)", flush=True)


async def _wait_ready(client: Any, names: Sequence[str], timeout_s: float) -> int:
    """Show progress until every named deployment has its replicas READY."""
    from shoal.rpc.clients import status_to_dict

    start = time.monotonic()
    last = ""
    while True:
        line, done = _progress(status_to_dict(await client.status()), names)
        if line != last:
            _show(line)
        last = line
        if done:
            if sys.stdout.isatty():
                print()
            print(f"ready after {time.monotonic() - start:.1f}s: {line}", flush=True)
            return 0
        if time.monotonic() - start > timeout_s:
            if sys.stdout.isatty():
                print()
            print(f"not ready after {timeout_s:g}s: {line}", file=sys.stderr, flush=True)
            return EXIT_ERROR
        await asyncio.sleep(0.25)


def cmd_scale(args: argparse.Namespace) -> int:
    if args.replicas < 0:
        raise InvalidArgument(f"replicas must be >= 0, got {args.replicas}")

    async def go(client: Any, settings: Settings) -> int:
        await client.scale(args.name, args.replicas)
        print(f"deployment {args.name} scaled to {args.replicas}")
        return 0

    return _with_client(args, go)


def cmd_delete(args: argparse.Namespace) -> int:
    async def go(client: Any, settings: Settings) -> int:
        await client.delete(args.name)
        print(f"deployment {args.name} deleted")
        return 0

    return _with_client(args, go)


def cmd_status(args: argparse.Namespace) -> int:
    from shoal.rpc.clients import status_to_dict

    async def go(client: Any, settings: Settings) -> int:
        status = status_to_dict(await client.status())
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            print(render_status(status))
        return 0

    return _with_client(args, go)


def cmd_logs(args: argparse.Namespace) -> int:
    async def go(client: Any, settings: Settings) -> int:
        out = sys.stdout.buffer
        async for data in client.read_log(args.replica_id, tail_bytes=args.tail_bytes, follow=args.follow):
            out.write(data)
            out.flush()
        return 0

    try:
        return _with_client(args, go)
    except KeyboardInterrupt:
        return 0


def render_status(status: dict[str, Any]) -> str:
    """The human table of ``shoal status``."""
    out: list[str] = []

    def table(headers: list[str], rows: list[list[str]]) -> None:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        out.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
        for r in rows:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())

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


def _jsonable(arr: np.ndarray) -> Any:
    if arr.dtype == object:
        return [
            _jsonable(a)
            if isinstance(a, np.ndarray)
            else (a.decode(errors="replace") if isinstance(a, bytes) else a)
            for a in arr.tolist()
        ]
    return arr.tolist()


def cmd_predict(args: argparse.Namespace) -> int:
    from shoal.core.spec import parse_spec
    from shoal.rpc.clients import send_request, status_to_dict

    async def go(client: Any, settings: Settings) -> int:
        status = status_to_dict(await client.status())
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

    return _with_client(args, go)


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

    return _with_client(args, go)


def cmd_token_list(args: argparse.Namespace) -> int:
    async def go(client: Any, settings: Settings) -> int:
        tokens = await client.list_tokens()
        width = max([4, *(len(t.name) for t in tokens)])
        print(f"{'NAME'.ljust(width)}  {'ROLE'.ljust(6)}  CREATED")
        for t in tokens:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.created))
            print(f"{t.name.ljust(width)}  {t.role.ljust(6)}  {created}")
        return 0

    return _with_client(args, go)


def cmd_token_revoke(args: argparse.Namespace) -> int:
    async def go(client: Any, settings: Settings) -> int:
        await client.revoke_token(args.name)
        print(f"token {args.name} revoked")
        return 0

    return _with_client(args, go)


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="shoal: distributed model serving")
    parser.add_argument("--head", help="the head's gRPC address (default $SHOAL_HEAD or localhost:8470)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run a head and one scheduler in the foreground")
    _add_cluster_flags(p)
    _add_scheduler_flags(p)
    p.add_argument("--head-port", type=int, help="head gRPC port (default 8470)")
    p.add_argument("--dashboard-port", type=int, help="head HTTP port: dashboard, REST API (default 8471)")
    p.add_argument("--deploy", action="append", default=[], metavar="FILE", help="deploy this spec once up")
    p.set_defaults(fn=cmd_up)

    p = sub.add_parser("head", help="run a head node")
    _add_cluster_flags(p)
    p.add_argument("--port", type=int, help="gRPC port (default 8470)")
    p.add_argument("--http-port", type=int, help="HTTP port (default 8471)")
    p.set_defaults(fn=cmd_head)

    p = sub.add_parser("scheduler", help="run a scheduler that joins a head")
    _add_cluster_flags(p)
    _add_scheduler_flags(p)
    p.set_defaults(fn=cmd_scheduler)

    p = sub.add_parser("deploy", help="create or update deployments from YAML files")
    p.add_argument("files", nargs="+")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="return without waiting for replicas")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for replicas (default 120)")
    _add_client_flags(p)
    p.set_defaults(fn=cmd_deploy)

    p = sub.add_parser("scale", help="set a deployment's replica count")
    p.add_argument("name")
    p.add_argument("replicas", type=int)
    _add_client_flags(p)
    p.set_defaults(fn=cmd_scale)

    p = sub.add_parser("delete", help="delete a deployment and stop its replicas")
    p.add_argument("name")
    _add_client_flags(p)
    p.set_defaults(fn=cmd_delete)

    p = sub.add_parser("status", help="show schedulers, deployments and replicas")
    p.add_argument("--json", action="store_true")
    _add_client_flags(p)
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("logs", help="print a replica's log, wherever it runs")
    p.add_argument("replica_id")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what the replica writes")
    p.add_argument("--tail-bytes", type=int, default=0, help="start this many bytes before the end")
    _add_client_flags(p)
    p.set_defaults(fn=cmd_logs)

    p = sub.add_parser("predict", help="send one request and print the outputs as JSON")
    p.add_argument("name")
    p.add_argument("--data", required=True, help="JSON inputs, e.g. '{\"x\": [[1, 2]]}', or @file.json")
    p.add_argument("--scheduler", help="send to this scheduler's gRPC address (default: any live one)")
    p.add_argument("--timeout", type=float, default=0.0, help="seconds (default: the deployment's)")
    p.add_argument("-v", "--verbose", action="store_true", help="say which replica answered")
    _add_client_flags(p)
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("certs", help="certificates for mutual TLS inside the cluster")
    certs_sub = p.add_subparsers(dest="certs_command", required=True)
    q = certs_sub.add_parser("init", help="create a cluster CA and a certificate per role in DIR")
    q.add_argument("dir")
    q.add_argument(
        "--host",
        action="append",
        default=[],
        dest="hosts",
        help="a name or address clients dial (repeatable; localhost and 127.0.0.1 are always in)",
    )
    q.add_argument("--force", action="store_true", help="replace the certificates already in DIR")
    q.set_defaults(fn=cmd_certs_init)

    p = sub.add_parser("token", help="tokens for users of the control API and of inference")
    token_sub = p.add_subparsers(dest="token_command", required=True)
    q = token_sub.add_parser("create", help="create a token and print it (once: only its hash is kept)")
    q.add_argument("--role", required=True, choices=["infer", "read", "deploy", "admin"])
    q.add_argument("--name", default="", help="its name (default: generated)")
    _add_client_flags(q)
    q.set_defaults(fn=cmd_token_create)
    q = token_sub.add_parser("list", help="list tokens: name, role, created")
    _add_client_flags(q)
    q.set_defaults(fn=cmd_token_list)
    q = token_sub.add_parser("revoke", help="revoke a token by name")
    q.add_argument("name")
    _add_client_flags(q)
    q.set_defaults(fn=cmd_token_revoke)
    from shoal import chaos, loadgen

    loadgen.add_parser(sub)
    chaos.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.fn(args)
    except ShoalError as err:
        print(f"shoal: error: {err}", file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
