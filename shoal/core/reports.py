"""Bounds on what a scheduler tells the head: its registration and its health updates.

A scheduler needs no more than the scheduler role's token or certificate, and the head
took its strings as they came: a registration with 1 MB for its id, address, HTTP address
and hostname, and a replica report with a 1 MB message, made ``GET /api/status`` 11 MB, an
event and a log line of 2 MB at each registration, and put the id into the routing table
sent to every scheduler (1 MB more each). An update from an unknown 1 MB id wrote a 1 MB
log line each heartbeat.

Ids and names are refused past their bounds (InvalidArgument naming the field and its
limit); free text (a hostname, a replica's message) is cut, saying how much was left out.
None of these bounds refuses what a scheduler of this project sends: replica ids are the
ones the head made (:data:`~shoal.core.cluster.REPLICA_ID`), deployment names passed the
deployment name rules, and a scheduler refuses to start with an id past
:data:`~shoal.core.limits.SCHEDULER_ID` (setting ``scheduler_id``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping

from shoal.core import limits
from shoal.core.cluster import REPLICA_ID, ReplicaReport
from shoal.core.spec import NAME_PATTERN
from shoal.core.stats import BUCKETS
from shoal.errors import InvalidArgument
from shoal.types import LoadReport

MAX_ADDRESS_CHARS = limits.MAX_HOST_CHARS + 47
"""The longest address (``HOST:PORT``) a scheduler may give for itself or a replica: a host
of :data:`~shoal.core.limits.MAX_HOST_CHARS` (the most ``advertise_host`` may be) and a
port, with room to spare."""

MAX_HOSTNAME_CHARS = 253
"""How much of a scheduler's hostname the head keeps (a DNS name's most); the rest is cut."""

MAX_SPEC_HASH_CHARS = 128
"""The longest spec hash a replica report may carry (a process hash is 64 hex digits)."""

MAX_REPORTS = 10_000
"""Most replica reports one registration or health update carries, and most deployments
its load names: a scheduler runs at most ``max_replicas`` (100 by default, one per 128 MB
it offers), and the head keeps at most ``max_deployments``. Each report costs the head
Python work under its lock; a 64 MiB update of tiny ones held millions."""

_NAME = re.compile(NAME_PATTERN)


def check_scheduler_id(scheduler_id: str) -> None:
    """InvalidArgument naming the field ``scheduler_id`` unless it is a scheduler id."""
    problem = limits.scheduler_id_problem(scheduler_id)
    if problem is not None:
        raise InvalidArgument(f"scheduler_id: {problem}")


def check_address(field: str, address: str, *, required: bool = True) -> None:
    """InvalidArgument naming ``field`` when ``address`` is empty (and ``required``) or longer
    than :data:`MAX_ADDRESS_CHARS`."""
    if required and not address:
        raise InvalidArgument(f"{field} is required")
    if len(address) > MAX_ADDRESS_CHARS:
        raise InvalidArgument(
            f"{field} is {len(address)} characters, over the limit of {MAX_ADDRESS_CHARS}: "
            f"{limits.quoted(address)}"
        )


def check_registration(scheduler_id: str, address: str, http_address: str) -> None:
    """InvalidArgument, naming the field and its limit, for a registration's id or addresses."""
    check_scheduler_id(scheduler_id)
    check_address("address", address)
    check_address("http_address", http_address, required=False)


def kept_hostname(text: str) -> str:
    """A scheduler's hostname as the head keeps it: at most :data:`MAX_HOSTNAME_CHARS`."""
    return limits.shown(text, MAX_HOSTNAME_CHARS)


def check_deployment_name(field: str, name: str) -> None:
    """InvalidArgument naming ``field`` unless ``name`` follows the deployment name rules."""
    if not _NAME.match(name):
        raise InvalidArgument(
            f"{field}: {limits.quoted(name)} is no deployment name: lowercase letters, digits, '-', "
            "'_' and '.', starting and ending with a letter or digit, at most 63 characters"
        )


def checked_report(rep: ReplicaReport) -> ReplicaReport:
    """``rep`` with its message cut to :data:`limits.ERROR_TEXT_CHARS` (a replica's exit
    reason quotes its model's error, cut as much by the replica already). InvalidArgument,
    naming the field, for an id, deployment name, address or spec hash past its bound."""
    if not REPLICA_ID.fullmatch(rep.id):
        raise InvalidArgument(
            f"replica_id: {limits.quoted(rep.id)} is no replica id: lowercase letters, digits, '-', "
            "'_' and '.', at most 128 characters"
        )
    check_deployment_name(f"replica {rep.id}: deployment", rep.deployment)
    check_address(f"replica {rep.id}: address", rep.address, required=False)
    if len(rep.spec_hash) > MAX_SPEC_HASH_CHARS:
        raise InvalidArgument(
            f"replica {rep.id}: spec_hash is {len(rep.spec_hash)} characters, over the limit of "
            f"{MAX_SPEC_HASH_CHARS}"
        )
    if len(rep.message) <= limits.ERROR_TEXT_CHARS:
        return rep
    return dataclasses.replace(rep, message=limits.shown(rep.message, limits.ERROR_TEXT_CHARS))


def checked_reports(reports: Collection[ReplicaReport]) -> list[ReplicaReport]:
    """:func:`checked_report` of each; InvalidArgument past :data:`MAX_REPORTS` of them."""
    if len(reports) > MAX_REPORTS:
        raise InvalidArgument(f"replicas: {len(reports)} reports, over the limit of {MAX_REPORTS}")
    return [checked_report(r) for r in reports]


def checked_load(load: Mapping[str, LoadReport]) -> dict[str, LoadReport]:
    """``load`` as the head keeps it: each deployment's latency counts dropped when they are
    not one per bucket of :data:`shoal.core.stats.BUCKETS` and one past them (a scheduler
    of another version may count in other buckets: its update is still taken, its charts
    skip those counts, as they did; but a million counts were kept before). InvalidArgument
    unless every deployment it names follows the name rules and they are at most
    :data:`MAX_REPORTS`."""
    if len(load) > MAX_REPORTS:
        raise InvalidArgument(f"load: {len(load)} deployments, over the limit of {MAX_REPORTS}")
    buckets = len(BUCKETS) + 1
    kept: dict[str, LoadReport] = {}
    for name, report in load.items():
        check_deployment_name("load", name)
        if report.latency and len(report.latency) != buckets:
            report = dataclasses.replace(report, latency=())
        kept[name] = report
    return kept
