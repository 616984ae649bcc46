"""The ``shoal`` command.

Cluster processes: ``up`` (head + one scheduler), ``head``, ``scheduler``; ``down`` stops
them from another shell. Client commands talk to the head named by ``--head`` (before or
after the command) or ``SHOAL_HEAD``: ``deploy``, ``history``, ``rollback``, ``restart``,
``events``, ``scale``, ``delete``, ``status``, ``logs``, ``predict``, ``token``. Errors are
one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from shoal import __version__, grpc_defaults  # noqa: F401 - before grpc is imported: see its docstring
from shoal.cli import deploy, logs, processes, revisions, routes
from shoal.cli.commands import (
    cmd_certs_init,
    cmd_certs_renew,
    cmd_delete,
    cmd_predict,
    cmd_scale,
    cmd_status,
    cmd_token_create,
    cmd_token_list,
    cmd_token_revoke,
    render_status,
)
from shoal.cli.common import add_client_flags, run_command

__all__ = ["build_parser", "main", "render_status"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="shoal: distributed model serving")
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    parser.add_argument("--head", help="the head's gRPC address (default $SHOAL_HEAD or localhost:8470)")
    sub = parser.add_subparsers(dest="command", required=True)

    processes.add_parsers(sub)
    deploy.add_parser(sub)
    revisions.add_parsers(sub)
    routes.add_parser(sub)

    p = sub.add_parser("scale", help="set a deployment's replica count")
    p.add_argument("name", help="the deployment's name")
    p.add_argument("replicas", type=int, help="the replica count, from 0")
    p.add_argument(
        "--if-revision",
        type=int,
        metavar="N",
        help="scale only if the deployment is at revision N now (its spec did not change since "
        "you read it); otherwise fail naming its revision, changing nothing",
    )
    p.add_argument(
        "--if-replicas",
        type=int,
        metavar="N",
        help="scale only if the deployment's replica count is N now (nobody scaled it since you "
        "read it, as kubectl scale --current-replicas); otherwise fail naming its count, "
        "changing nothing",
    )
    add_client_flags(p)
    p.set_defaults(fn=cmd_scale)

    p = sub.add_parser("delete", help="delete a deployment and stop its replicas")
    p.add_argument("name", help="the deployment's name")
    add_client_flags(p)
    p.set_defaults(fn=cmd_delete)

    p = sub.add_parser("status", help="show schedulers, deployments and replicas")
    p.add_argument("--json", action="store_true", help="print every field as JSON (for programs)")
    add_client_flags(p)
    p.set_defaults(fn=cmd_status)

    logs.add_parser(sub)

    p = sub.add_parser("predict", help="send one request and print the outputs as JSON")
    p.add_argument("name", help="the deployment (or traffic route) to call")
    p.add_argument("--data", required=True, help="JSON inputs, e.g. '{\"x\": [[1, 2]]}', or @file.json")
    p.add_argument(
        "--scheduler",
        help="send to this scheduler's gRPC address (default: any live one, as the head names them; "
        "a token of role infer may not ask the head, so it needs this)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="seconds, finite (default: the deployment's); the client waits at most 1e9 s (31 years)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="say which replica answered")
    add_client_flags(p)
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("certs", help="certificates for mutual TLS inside the cluster")
    certs_sub = p.add_subparsers(dest="certs_command", required=True)
    q = certs_sub.add_parser("init", help="create a cluster CA and a certificate per role in DIR")
    q.add_argument("dir", help="the folder to write ca.crt, ca.key and a key pair per role to")
    q.add_argument(
        "--host",
        action="append",
        default=[],
        dest="hosts",
        help="a name or address clients dial (repeatable; localhost and 127.0.0.1 are always in)",
    )
    q.add_argument("--force", action="store_true", help="replace the certificates already in DIR")
    q.set_defaults(fn=cmd_certs_init)
    q = certs_sub.add_parser(
        "renew",
        help="sign the certificates in DIR again with its CA (new end, same keys); running "
        "components take them without a restart",
    )
    q.add_argument("dir", help="the folder 'shoal certs init' wrote (ca.key needed)")
    q.add_argument(
        "--role",
        action="append",
        default=[],
        dest="roles",
        choices=["head", "scheduler", "replica", "client"],
        help="renew this role's certificate (repeatable; default: every role's)",
    )
    q.add_argument("--days", type=float, default=825, help="days the new certificates last (default 825)")
    q.add_argument(
        "--host",
        action="append",
        default=[],
        dest="hosts",
        help="the names and addresses clients dial, replacing the certificates' (repeatable; "
        "default: keep their names)",
    )
    q.set_defaults(fn=cmd_certs_renew)

    p = sub.add_parser("token", help="tokens for users of the control API and of inference")
    token_sub = p.add_subparsers(dest="token_command", required=True)
    q = token_sub.add_parser("create", help="create a token and print it (once: only its hash is kept)")
    q.add_argument(
        "--role",
        required=True,
        choices=["infer", "read", "deploy", "admin"],
        help="what it may do, each role what the ones before it may too: infer (send requests), read "
        "(status, logs), deploy (change deployments and routes), admin (tokens)",
    )
    q.add_argument("--name", default="", help="its name (default: generated)")
    add_client_flags(q)
    q.set_defaults(fn=cmd_token_create)
    q = token_sub.add_parser("list", help="list tokens: name, role, created")
    add_client_flags(q)
    q.set_defaults(fn=cmd_token_list)
    q = token_sub.add_parser("revoke", help="revoke a token by name")
    q.add_argument("name", help="the token's name, as 'shoal token list' shows it")
    add_client_flags(q)
    q.set_defaults(fn=cmd_token_revoke)
    from shoal import chaos, loadgen

    loadgen.add_parser(sub)
    chaos.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    run_command(build_parser().parse_args(argv))
