"""One settings object for every component.

Built once, at the entrypoint, from (highest first) command-line flags,
environment variables (``SHOAL_<FIELD>``, and ``SHOAL_HEAD`` for
``head_address``), a YAML config file, then the defaults below; then passed
down. Nothing reads the environment anywhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from shoal.core import yamldoc
from shoal.core.limits import MAX_HOST_CHARS, scheduler_id_problem, short_repr
from shoal.errors import InvalidArgument

log = logging.getLogger("shoal")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    """Address every server binds. Loopback unless TLS is configured."""
    advertise_host: str = ""
    """Address other components use to reach this one; ``host`` when empty. At most 253
    characters (``shoal.core.limits.MAX_HOST_CHARS``)."""
    head_address: str = "localhost:8470"
    """The head the CLI and schedulers talk to (``SHOAL_HEAD``). Several, comma-separated
    (``a:8470,b:8470``), for heads that stand by for each other on etcd: calls go to the one
    that leads."""
    head_port: int = 8470
    """Head gRPC port (control API, scheduler membership)."""
    head_http_port: int = 8471
    """Head HTTP port (REST API, dashboard)."""
    grpc_port: int = 8001
    """Scheduler gRPC ingress (native SendRequest, Open Inference Protocol)."""
    http_port: int = 8000
    """Scheduler HTTP ingress."""
    state_dir: str = ".shoal"
    """SQLite state and logs."""
    store: str = ""
    """Where the head keeps its state: empty for SQLite in ``state_dir``, or
    ``etcd://HOST:PORT[,HOST:PORT...]`` for an etcd cluster, on which several heads may run:
    one leads, the others stand by (``docs/operations.md``)."""
    store_tls_dir: str = ""
    """TLS to etcd: a folder with ``ca.crt`` and, for client certificates, ``client.crt`` and
    ``client.key``. Empty: plaintext."""
    store_root: str = "shoal/"
    """The etcd key prefix of this cluster's state (several clusters may share one etcd)."""
    scheduler_id: str = ""
    """Id of this scheduler. Empty: the id kept in ``<state_dir>/scheduler_id``
    (``sched-<hex>``, made at the first start; ``shoal.scheduler.node.scheduler_id``), so
    that a restarted scheduler takes its old place rather than leaving a DEAD one behind.
    One scheduler per state folder. Letters, digits, '-', '_' and '.', starting with a letter
    or digit, at most 253 characters (``shoal.core.limits.SCHEDULER_ID``): the head refuses
    others."""

    cpus: float = -1.0
    """CPUs this scheduler offers to replicas; -1: those its process may use (the machine's,
    or fewer under a CPU affinity or a control group's quota: ``shoal.scheduler.machine``)."""
    memory_mb: float = -1.0
    """Memory this scheduler offers, in MB; -1: what its process may use (the machine's, or
    less under a control group's limit)."""
    gpus: float = -1.0
    """GPUs this scheduler offers; -1 counts NVIDIA GPUs through NVML."""
    max_concurrent_starts: int = -1
    """Replica processes this scheduler starts at once: those past it wait QUEUED, with no
    process, in the order they came, until one that is starting is READY or gone; their
    ``health.start_timeout_s`` counts from their own start. -1: the CPUs it offers, rounded
    up, at least 4 (``shoal.scheduler.node.start_slots``). 0: no bound. Before, a deploy of
    50 replicas started 50 processes loading models at once on 2 CPUs, each slower than its
    start timeout."""
    max_replicas: int = -1
    """Replicas this scheduler runs at most, whatever their ``resources``: each is a process
    of its own (a Python interpreter and its model, 50 MB and more) that placement does not
    count in memory when its spec leaves ``memory_mb`` at 0. -1: one per
    ``REPLICA_MEMORY_MB`` (128) of the memory it offers, at most ``MAX_REPLICAS_DEFAULT``
    (100), at least 1 (``shoal.scheduler.node.replica_slots``). 0: no bound. The head places
    within it, and the scheduler refuses a create past it (ResourceExhausted) all the same."""

    heartbeat_interval_s: float = 1.0
    """How often a scheduler sends its health update to the head."""
    dead_after_s: float = 5.0
    """A scheduler silent this long is marked DEAD and its replicas are placed elsewhere. At
    least twice ``heartbeat_interval_s`` (checked where both are read, in one process's
    settings: a head and its schedulers may read different files)."""
    dead_after_stream_end_s: float = 3.0
    """A scheduler whose health stream to the head ended (its process exited, its connection
    closed) and that sends no update on a new stream this long is DEAD sooner than
    ``dead_after_s`` (the smaller of the two counts). A scheduler whose stream broke opens a
    new one at its next update, so keep this above two heartbeat intervals. 0: only
    ``dead_after_s``. A silent scheduler whose connection stays open (a machine lost, a
    network cut) still takes ``dead_after_s``."""
    forget_dead_after_s: float = 3600.0
    """A DEAD scheduler silent this long is dropped from the head's state and status (it may
    still register again later, as a new member); 0: never."""
    reconcile_interval_s: float = 1.0
    """How often the head compares desired with actual state (it also runs on every change)."""
    replica_health_interval_s: float = 1.0
    """How often a replica sends its health update to its scheduler."""
    orphan_after_s: float = 5.0
    """A replica that cannot reach its scheduler this long shuts itself down."""
    ping_interval_s: float = 1.0
    """How often a scheduler pings each replica."""
    ping_timeout_s: float = 2.0
    ping_failures: int = 3
    """Consecutive failed pings after which a replica is marked DEAD."""
    replica_start_timeout_s: float = 120.0
    """A replica that has not registered this long after its start is killed."""
    replica_log_max_mb: float = 10.0
    """A replica's log (``<state>/logs/replica_<id>.log``) that grows past this has its
    newest this much copied to ``replica_<id>.log.1`` (replacing the one before) and is
    emptied; 0: no limit."""
    replica_logs_kept: int = 50
    """Logs of replicas that no longer run kept by a scheduler: the newest this many; older
    ones are deleted when a replica ends and when the scheduler starts."""

    rpc_timeout_s: float = 5.0
    """Deadline of one control-plane call between components."""
    rpc_attempts: int = 4
    """Attempts of a control-plane call that fails with UNAVAILABLE (backoff between)."""
    request_attempts: int = 2
    """Replicas one inference request may be tried on when the one serving it dies: 2 retries
    once, so a request that kills every replica it reaches (a query of death) costs at most
    two replicas, then fails saying so."""
    max_message_mb: int = 64
    """Largest gRPC message accepted or sent (the gRPC default of 4 MiB is too small for tensors)."""
    max_inflight_mb: int = 512
    """Request tensor bytes a scheduler's ingress holds in flight at once, divided among its
    ingress processes (``shoal.core.budget``): past it a request waits for room until its
    deadline, and past twice it is refused (RESOURCE_EXHAUSTED / 503). One request runs
    whatever its size when nothing else is in flight, and requests of at most 64 KiB are
    never held back. 0: no limit."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM, how long in-flight work may take before processes are killed: a scheduler's
    requests admitted before the signal, then its replicas' drain, within it."""
    ingress_workers: int = 0
    """Processes that serve the scheduler's inference ports together (SO_REUSEPORT), each
    routing on its own: 0 is one per CPU, at most 4; 1 serves them from the scheduler's
    own process; at most 256. Limits and counts hold in total (``docs/architecture.md``)."""
    ingress_in_turn: bool = True
    """With several ingress processes, new connections go to them in turn (an eBPF program
    on the shared ports, ``shoal.core.reuseport``; loading it needs CAP_BPF or
    CAP_SYS_ADMIN). Off, or without those: the kernel's hash of the connection's addresses,
    which with few client connections often gives one process most of them."""
    ingress_pin_cpus: bool = True
    """With several ingress processes and at least as many CPUs, each keeps all its threads on
    a CPU of its own (``shoal.core.affinity``): gRPC hands every request between three threads
    of a process, and on one CPU those hand-overs need no wake-up of another CPU. Replicas
    stay free to run anywhere, but for their event loops (``replica_pin_loop``)."""
    replica_pin_loop: bool = True
    """With the ingress processes pinned (``ingress_pin_cpus``), the event-loop thread of the
    busiest replicas, one per ingress CPU, runs on that CPU (``shoal.core.affinity.LoopPins``):
    free, the kernel keeps moving a loop that two ingress processes wake from one CPU to the
    other. The model's own threads stay free, and every loop runs free while the replicas'
    other threads keep over half a CPU busy (a pinned loop could not leave a CPU a model
    computes on)."""
    replica_pin_interval_s: float = 0.25
    """How often the scheduler looks at which replicas' event loops were busiest and moves
    them (``replica_pin_loop``): when load moves from one model to another, its replica's
    loop is on an ingress CPU within about two of these. From 0.05 to 3600."""
    replica_oom_score_adj: int = 1000
    """What each replica writes to its ``/proc/self/oom_score_adj`` (Linux, -1000 to 1000): when
    the machine runs out of memory, the kernel's OOM killer then takes a replica, the one using
    the most first, before the scheduler, the head or anything else on the machine, and the
    scheduler replaces it. Below the scheduler's own value it needs CAP_SYS_RESOURCE; without
    it the replica keeps the scheduler's value and says so in its log."""
    replica_reap_orphans_s: float = 10.0
    """A process a replica's model detached (``sh -c "helper &"``, a daemon forked twice) is
    given to the replica (a child subreaper, ``shoal.core.subreaper``); once it exits, the
    replica reaps it after this many seconds (``OrphanReaper``), so that such processes do
    not pile up as zombies. 0: never (they are reaped when the replica exits)."""
    model_repository: str = ""
    """A Triton model repository folder this scheduler's repository extension serves
    (index, load, unload; ``shoal.scheduler.repository``). Empty: none."""
    data_plane: str = "socket"
    """Scheduler -> replica requests: ``socket`` (replicas on this machine over a Unix socket,
    ``shoal.rpc.hop``; others as ``stream``), ``stream`` (one gRPC PushTasks stream per
    replica) or ``unary`` (one gRPC call per request)."""
    hop_dir: str = ""
    """Folder of the local hop's sockets (``data_plane: socket``); set by the scheduler for
    its replicas and ingress workers (``shoal.rpc.hop.hop_dir``), not by users."""
    multiplex_affinity: bool = True
    """Send a multiplexed deployment's request to a replica that holds its model id (and spread
    new ids); false routes blind to model ids, only to measure what affinity is worth
    (``bench/multiplex.py``)."""
    event_loop: str = "auto"
    """``auto`` (uvloop when installed), ``uvloop`` or ``asyncio``."""
    log_format: str = "text"
    """``text`` or ``json``."""
    log_level: str = "INFO"
    """A ``logging`` level name, in any case: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``, ``CRITICAL``."""

    tls_dir: str = ""
    """Folder with the cluster CA and the components' certificates (``shoal certs init``).
    Set: every gRPC channel is mutual TLS and the HTTP servers serve HTTPS. Empty: plaintext,
    and servers may bind loopback only (unless ``insecure``)."""
    insecure: bool = False
    """Allow binding a non-loopback ``host`` without TLS (``--insecure``): a trusted network only."""
    token: str = ""
    """The bearer token the CLI sends to the head and to schedulers (``SHOAL_TOKEN``, ``--token``)."""
    max_tensor_elements: int = 16_777_216
    """Most tensor elements (all inputs together) one inference request may carry (0: no limit)."""
    max_tensors_per_request: int = 1024
    """Most tensors one inference request may name: its inputs, and the outputs it asks
    for, each counted on its own (0: no limit)."""
    max_strings_per_request: int = 2048
    """Most strings one ``/v1`` request may carry in one list: embeddings' ``input``, a chat's
    ``messages`` (with their text parts), ``prompt``, ``stop`` (OpenAI's own limit on
    embeddings' inputs and on a chat's messages; 0: no limit)."""
    max_stream_pending: int = 64
    """Most requests of one ``ModelStreamInfer`` stream running or answered but not yet read
    by the client; past it the stream stops reading until the client catches up."""
    max_json_on_loop_kb: int = 256
    """JSON inference bodies larger than this are parsed in a separate process, so one big body
    does not hold up every other request on the event loop."""
    max_concurrent_streams: int = 1024
    """Most concurrent calls on one gRPC connection (``grpc.max_concurrent_streams``)."""
    grpc_handshake_timeout_s: float = 10.0
    """Every gRPC server (head, scheduler, ingress processes, replicas): a connection must
    finish its TLS handshake and send the HTTP/2 preface within this long of opening, or it is
    closed (``grpc.server_handshake_timeout_ms``; gRPC's own default is 120 s)."""
    grpc_idle_timeout_s: float = 0.0
    """A gRPC connection with no call for this long is closed with a GOAWAY
    (``grpc.max_connection_idle_ms``); the client connects again for its next call. 0: never,
    the default: a call that crosses the GOAWAY fails UNAVAILABLE on a channel without
    transparent retries, as shoal's own are (``grpc.enable_retries`` 0)."""
    grpc_max_connections: int = 4096
    """Most connections one gRPC server accepts at once (``grpc.max_allowed_incoming_connections``);
    past it a new connection is closed at once (its client sees UNAVAILABLE), while those open
    are served. 0: no limit."""
    http_header_timeout_s: float = 10.0
    """Every HTTP server (head REST, scheduler ingress, each ingress process): a connection must
    send a whole request head within this long of opening, or of the first byte of its next
    request; else 408 and the connection is closed (a slowloris client holds nothing). 0: no limit."""
    http_idle_timeout_s: float = 15.0
    """An HTTP keep-alive connection idle this long between requests is closed, and so is one
    whose client takes no byte of its answer this long (a stream it opened stops)."""
    http_max_connections: int = 4096
    """Most HTTP connections one server process holds open; past it a new connection gets 503
    and is closed at once, while those open are served. Each ingress process has its own. 0: no limit."""
    sse_keepalive_s: float = 15.0
    """A streamed generation (OpenAI's ``stream``, Triton's ``generate_stream``) that sends
    nothing for this long sends an SSE comment line, ``: keep-alive``, which clients skip:
    proxies cut connections idle for 60 s by default. It does not count as the client
    reading (``http_idle_timeout_s``). 0: never."""
    control_rate_limit: float = 100.0
    """Requests per second one client (its token, else its address) may make on the head's
    control API (bursts up to twice that); 0 turns the limit off."""
    max_log_streams: int = 128
    """Most replica log reads (``shoal logs``, ``--follow`` or not; ``ReadLog``, ``GET
    /api/replicas/ID/logs``) the head relays at once; past it one more is refused
    (``ResourceExhausted``: RESOURCE_EXHAUSTED / HTTP 503). Each holds a stream on the head's
    connection to the replica's scheduler, which its own calls to that scheduler need too
    (keep it under the schedulers' ``max_concurrent_streams``), and up to about 8 MB of log
    in the head while its client reads nothing. ``shoal logs DEPLOYMENT --follow`` takes one
    per replica. 0: no limit."""
    max_log_streams_per_client: int = 64
    """Most of those one client holds at once (its token when it presents a valid one, else
    its address, as for ``control_rate_limit``); past it its next is refused
    (``ResourceExhausted``), so that one client (a follow of a large deployment, a script
    that never ends its reads) cannot take every place. ``shoal logs DEPLOYMENT --follow``
    follows as many replicas as it has room for and asks again for the others. 0: no limit
    but ``max_log_streams``."""
    log_stream_stall_s: float = 60.0
    """How long the head waits for a log read's client to take its next chunk (gRPC
    ``ReadLog``: ``shoal logs``, ``--follow`` or not) before it ends the read,
    RESOURCE_EXHAUSTED naming this setting: a client that reads nothing holds up to about
    8 MB of log in the head (gRPC's windows) and a place of ``max_log_streams``. A follow of
    a quiet log waits for nothing and is not ended."""
    max_deployments: int = 2000
    """Most deployments the head keeps (broken ones count); creating one more is refused
    (``LimitReached``: RESOURCE_EXHAUSTED / HTTP 409), updating or deleting one is not. Each
    costs the head work at every reconcile pass and every routing table it sends, and lines
    of its status and metrics (``docs/operations.md``, "Limits of the head")."""
    max_routes: int = 2000
    """Most traffic routes the head keeps; creating one more is refused as past
    ``max_deployments``. Every routing table the head sends carries all of them."""
    max_tokens: int = 1000
    """Most tokens the head keeps; creating one more is refused as past ``max_deployments``.
    Every control call compares its token with each of them, and every routing table
    carries their hashes."""
    max_schedulers: int = 1000
    """Most schedulers the head keeps, live and dead (until ``forget_dead_after_s`` forgets
    them); a new scheduler id past it takes the place of the dead one silent longest, and
    with none dead is refused as past ``max_deployments`` (its scheduler tries again each
    heartbeat). A known id registering again (a restart) is never refused. Each costs the
    head lines of its status (about 270 bytes) and work at every reconcile pass."""
    max_specs_mb: int = 1024
    """Most megabytes of deployment specs the head keeps: the JSON of each deployment's
    spec and of its kept revisions (up to 20 each; a spec may take 2 MiB). Once over it,
    an apply that changes a spec is refused as past ``max_deployments``; a restart or
    rollback is not, nor a delete, which makes room."""
    allowed_model_dirs: tuple[str, ...] = ()
    """Folders that model code and files may come from (``python`` modules, ``sklearn`` and
    ``onnx`` files); a spec naming anything outside is refused. Empty: any folder. In the
    environment, folders separated by ``os.pathsep``."""
    allowed_model_uris: str = ""
    """URI prefixes models may be fetched from (``model: s3://...``), separated by spaces or
    commas, e.g. ``s3://models/prod/ https://files.example.com/models/``. Empty: any URI while
    ``allowed_model_dirs`` is empty, none once it is set (``shoal.core.model_dirs``)."""
    artifact_cache_mb: int = 10240
    """Most megabytes a scheduler's cache of fetched models (``<state_dir>/artifacts``) keeps:
    past it the least recently used ones that no replica runs from are deleted."""
    max_blob_mb: int = 10240
    """Largest model file or packed folder the head takes from ``shoal deploy`` (its blob
    store, ``<state_dir>/blobs``)."""
    max_blobs_mb: int = 51200
    """Most megabytes of blobs the head keeps in all (whole, and uploads in progress or
    dropped, at the size they announced); an upload past it is refused. Uploads are also
    refused when they would leave under 1 GB free on the disk of ``<state_dir>/blobs``."""
    max_blobs: int = 10000
    """Most blobs the head keeps in all (whole, and uploads in progress or dropped); an upload
    of one more is refused (``LimitReached``, RESOURCE_EXHAUSTED), an upload that continues
    one kept is not. Each is a file under ``<state_dir>/blobs`` that every upload's
    admission looks at (10,000: 50 ms of a worker thread per upload taken)."""
    blob_grace_s: float = 3600.0
    """The head deletes a blob no deployment and no kept revision names once it has gone
    unnamed this long (and a dropped upload this long after its last byte)."""

    @property
    def model_uri_prefixes(self) -> tuple[str, ...]:
        """``allowed_model_uris`` as a tuple of prefixes."""
        return tuple(p for p in re.split(r"[\s,]+", self.allowed_model_uris) if p)

    @property
    def advertised(self) -> str:
        return self.advertise_host or self.host

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(
        cls,
        *,
        file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
        flag_names: Mapping[str, str] | None = None,
    ) -> Settings:
        """Merge defaults < file < environment < flags. ``None`` flag values are ignored.
        ``flag_names``: the flag a setting came from where it is not ``--`` and the setting's
        name with dashes (``shutdown_grace_s`` from ``--grace``), for messages.

        Raises InvalidArgument naming the source of a bad value.
        """
        env = os.environ if env is None else env
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        if file is not None:
            text = yamldoc.read_text(Path(file), "config file")
            try:
                doc = yamldoc.load(text) or {}
            except yaml.YAMLError as err:
                raise InvalidArgument(f"cannot read config file {file}: {yamldoc.problem(err)}") from None
            except RecursionError:
                raise InvalidArgument(f"config file {file} is nested too deeply") from None
            if not isinstance(doc, dict):
                raise InvalidArgument(f"config file {file} must hold a mapping")
            for key, value in doc.items():
                if key not in known:
                    raise InvalidArgument(f"config file {file}: unknown setting {short_repr(key)}")
                values[key] = _coerce(known[key], value, f"config file {file}")
        for name, f in known.items():
            var = "SHOAL_HEAD" if name == "head_address" else f"SHOAL_{name.upper()}"
            if var == "SHOAL_HEAD" and not env.get(var, "").strip():
                continue  # SHOAL_HEAD= clears an exported one (the default head), as unset
            if var in env:
                values[name] = _coerce(f, env[var], f"environment variable {var}")
        _warn_misspelt(env, {"SHOAL_HEAD" if n == "head_address" else f"SHOAL_{n.upper()}" for n in known})
        for name, value in (flags or {}).items():
            if value is None:
                continue
            if name not in known:
                raise InvalidArgument(f"unknown setting {name!r}")
            flag = (flag_names or {}).get(name) or f"--{name.replace('_', '-')}"
            values[name] = _coerce(known[name], value, flag)
        settings = cls(**values)
        if settings.dead_after_s < 2 * settings.heartbeat_interval_s:
            # A scheduler would be declared dead between two of its own updates, register again
            # at the next one, and so on: 0.5 s against 1 s re-registered it every second.
            raise InvalidArgument(
                f"dead_after_s ({settings.dead_after_s:g}) must be at least twice "
                f"heartbeat_interval_s ({settings.heartbeat_interval_s:g}), or a scheduler is "
                "declared dead between its own health updates"
            )
        return settings


_NOT_SETTINGS = frozenset({"SHOAL_INGRESS_WORKER"})
"""``SHOAL_`` variables that are no setting and look like one: an ingress worker's start
document (``shoal.ingress_worker``)."""
_MEANT = {
    "SHOAL_HEAD_ADDRESS": "SHOAL_HEAD",
    "SHOAL_DASHBOARD_PORT": "SHOAL_HEAD_HTTP_PORT",
    "SHOAL_GRACE": "SHOAL_SHUTDOWN_GRACE_S",
    "SHOAL_STATE": "SHOAL_STATE_DIR",
    "SHOAL_ALLOW_MODEL_DIR": "SHOAL_ALLOWED_MODEL_DIRS",
    "SHOAL_CONFIG": "the flag --config",
}
"""Variables a user tries from a setting's name or its flag's, which name no setting, and
what they meant. Before, ``SHOAL_HEAD_ADDRESS`` (``SHOAL_<SETTING>`` for ``head_address``),
``SHOAL_GRACE`` and ``SHOAL_CONFIG`` were ignored without a word, and ``SHOAL_DASHBOARD_PORT``
was said to be close to ``SHOAL_HEAD_PORT``, the head's gRPC port."""
_warned: set[str] = set()


def _warn_misspelt(env: Mapping[str, str], variables: set[str]) -> None:
    """Log, once a process, each ``SHOAL_`` variable that names no setting but is close to
    one's (or in :data:`_MEANT`). Before, ``SHOAL_INGRES_WORKERS=1`` was ignored without a
    word and the scheduler ran its default. A warning, not an error: other tools may have
    ``SHOAL_`` variables."""
    for var in env:
        if not var.startswith("SHOAL_") or var in variables or var in _NOT_SETTINGS or var in _warned:
            continue
        close = (
            [_MEANT[var]]
            if var in _MEANT
            else difflib.get_close_matches(var, sorted(variables), n=1, cutoff=0.8)
        )
        if close:
            _warned.add(var)
            log.warning(
                "environment variable %s names no setting and is ignored; did you mean %s?", var, close[0]
            )


@dataclass(frozen=True)
class _Range:
    """The values a number setting may take: from ``low`` (above it when ``above``) up to
    ``high``, or one of ``also``."""

    low: float
    high: float | None = None
    above: bool = False
    also: tuple[float, ...] = ()

    def holds(self, value: float) -> bool:
        if value in self.also:
            return True
        if value < self.low or (self.above and value == self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        if self.high is not None:
            allowed = f"from {_number(self.low)} to {_number(self.high)}"
        else:
            allowed = f"{'>' if self.above else '>='} {_number(self.low)}"
        return " or ".join([*(_number(v) for v in self.also), allowed])


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


_PORT = _Range(0, 65535)
_AUTO = _Range(0, also=(-1,))  # -1: read the machine
_POSITIVE = _Range(0, above=True)  # a period or a deadline: 0 would spin or fail at once
_NATURAL = _Range(0)  # a size, a count or a timeout where 0 means none or no limit
_ONE_OR_MORE = _Range(1)
_INT32 = 2**31 - 1  # gRPC takes its integer options as C ints

_RANGES: dict[str, _Range] = {
    "head_port": _PORT,
    "head_http_port": _PORT,
    "grpc_port": _PORT,
    "http_port": _PORT,
    "cpus": _AUTO,
    "memory_mb": _AUTO,
    "gpus": _AUTO,
    "max_concurrent_starts": _AUTO,  # -1: from the CPUs offered
    "max_replicas": _Range(0, _INT32, also=(-1,)),  # -1: from the memory offered; int32 on the wire
    "heartbeat_interval_s": _POSITIVE,
    # 0: every scheduler is DEAD before its first update reaches the head, which NACKs
    # each update and the scheduler registers again, over and over.
    "dead_after_s": _POSITIVE,
    "dead_after_stream_end_s": _NATURAL,
    "forget_dead_after_s": _NATURAL,
    "reconcile_interval_s": _POSITIVE,
    "replica_health_interval_s": _POSITIVE,
    "orphan_after_s": _POSITIVE,
    "ping_interval_s": _POSITIVE,
    # The kernel counts CPU time in 10 ms ticks: looks closer than 50 ms apart see no use at
    # all, and would read /proc for every replica in a near-spin.
    "replica_pin_interval_s": _Range(0.05, 3600),
    "ping_timeout_s": _POSITIVE,
    "ping_failures": _ONE_OR_MORE,
    "replica_start_timeout_s": _POSITIVE,
    "replica_log_max_mb": _NATURAL,
    "replica_logs_kept": _NATURAL,
    "rpc_timeout_s": _POSITIVE,
    "rpc_attempts": _ONE_OR_MORE,
    "request_attempts": _ONE_OR_MORE,
    "max_message_mb": _Range(1, _INT32 // 2**20),  # in bytes, a gRPC option
    "max_inflight_mb": _NATURAL,
    "shutdown_grace_s": _NATURAL,
    # Each is a process (about 25 MB): a typo such as 100000 forked until the machine ran out.
    "ingress_workers": _Range(0, 256),
    "replica_oom_score_adj": _Range(-1000, 1000),
    "replica_reap_orphans_s": _Range(0, 86_400),
    "max_tensor_elements": _NATURAL,
    "max_tensors_per_request": _NATURAL,
    "max_strings_per_request": _NATURAL,
    "max_stream_pending": _ONE_OR_MORE,
    "max_json_on_loop_kb": _NATURAL,
    "max_concurrent_streams": _Range(1, _INT32),
    # gRPC takes milliseconds as a C int: at most about 24 days.
    "grpc_handshake_timeout_s": _Range(0, _INT32 // 1000, above=True),
    "grpc_idle_timeout_s": _Range(0, _INT32 // 1000),
    "grpc_max_connections": _Range(0, _INT32),
    "http_header_timeout_s": _NATURAL,
    "http_idle_timeout_s": _NATURAL,
    "http_max_connections": _NATURAL,
    "sse_keepalive_s": _NATURAL,
    "control_rate_limit": _NATURAL,
    "max_log_streams": _NATURAL,
    "max_log_streams_per_client": _NATURAL,
    "log_stream_stall_s": _POSITIVE,
    # A bound, not off at 0: with none, one deploy token's loop stalled the head for everyone.
    "max_deployments": _ONE_OR_MORE,
    "max_routes": _ONE_OR_MORE,
    "max_tokens": _ONE_OR_MORE,
    "max_specs_mb": _ONE_OR_MORE,
    "max_schedulers": _ONE_OR_MORE,
    "artifact_cache_mb": _NATURAL,
    "max_blob_mb": _NATURAL,
    "max_blobs_mb": _NATURAL,
    "max_blobs": _ONE_OR_MORE,
    # The head collects unnamed blobs every min(60 s, this): 0 would collect without pause.
    "blob_grace_s": _POSITIVE,
}
"""The range of every number setting (a test checks that none is left out)."""

_CHOICES: dict[str, tuple[str, ...]] = {
    "log_format": ("text", "json"),
    "event_loop": ("auto", "uvloop", "asyncio"),
    "data_plane": ("socket", "stream", "unary"),
}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _coerce(f: dataclasses.Field[Any], value: Any, source: str) -> Any:
    """``value`` as the field's type: strings (environment, flags) are parsed; others must fit
    exactly. A float must be finite: NaN compares false with everything, so ``dead_after_s:
    nan`` would never declare a scheduler dead, and no setting means anything at infinity.
    A number must be in the field's range (``_RANGES``), a choice one of its choices."""
    result = _parse(f, value, source)
    if isinstance(result, float) and not math.isfinite(result):
        raise InvalidArgument(f"{source}: {f.name} must be a finite number, got {short_repr(value)}")
    allowed = _RANGES.get(f.name)
    if allowed is not None and not allowed.holds(result):
        raise InvalidArgument(f"{source}: {f.name} must be {allowed}, got {short_repr(value)}")
    choices = _CHOICES.get(f.name)
    if choices is not None and result not in choices:
        raise InvalidArgument(f"{source}: {f.name} must be {' or '.join(choices)}, got {short_repr(value)}")
    if f.name == "head_address":
        _check_head_address(result, source)
    if f.name == "token":
        _check_token(result, source)
    if f.name == "scheduler_id" and result:
        # Checked here, so that a scheduler with an id the head refuses does not start.
        problem = scheduler_id_problem(result)
        if problem is not None:
            raise InvalidArgument(f"{source}: {problem}")
    if f.name == "advertise_host" and len(result) > MAX_HOST_CHARS:
        raise InvalidArgument(
            f"{source}: advertise_host is {len(result)} characters, over the limit of {MAX_HOST_CHARS}"
        )
    # logs.setup upper-cases the name; the logging module knows a few more (WARN, FATAL, NOTSET).
    if f.name == "log_level" and result.upper() not in logging.getLevelNamesMapping():
        raise InvalidArgument(
            f"{source}: log_level must be {', '.join(_LOG_LEVELS[:-1])} or {_LOG_LEVELS[-1]}, "
            f"got {short_repr(value)}"
        )
    return result


def _check_token(value: str, source: str) -> None:
    """A token travels in a header (``authorization: Bearer TOKEN``), which takes visible ASCII
    only: before, a token read from a file with its line end (``\\r`` of a Windows file) or
    one of other characters ended every command in a traceback from gRPC's insides
    (``ExecuteBatchError``). The message names the character, never the token."""
    for i, char in enumerate(value):
        if not "!" <= char <= "~":
            raise InvalidArgument(
                f"{source}: token must be visible ASCII characters (as 'shoal token create' makes "
                f"them), got {char!r} at position {i} (the token is not shown)"
            )


def _check_head_address(value: str, source: str) -> None:
    """Each of the comma-separated heads is HOST:PORT with a port gRPC can dial. Before, a
    port past 65535 was not refused: ``127.0.0.1:99999`` dialled port 34463 (gRPC keeps the
    low 16 bits), and P + 65536 reached P. At least one: before, ``SHOAL_HEAD=`` (or ``,``)
    was taken, and failed later with 'no head address in ''', naming no setting."""
    if not value.replace(",", "").strip():
        raise InvalidArgument(
            f"{source}: head_address must name a head, HOST:PORT (comma-separated for several); "
            f"got {short_repr(value)}"
        )
    for address in (a.strip() for a in value.split(",")):
        if not address:
            continue
        # Before, both were taken and dialled: a URL failed at the first call with 'Misformatted
        # domain name', and ::1:8470 reached [::0.1.132.112]:443 (gRPC read it as one IPv6 host).
        url = re.match(r"(?i)(https?|grpcs?)://([^/]*)", address)
        if url:
            raise InvalidArgument(
                f"{source}: head_address is HOST:PORT (the head's gRPC port), not a URL; "
                f"got {short_repr(address)}, did you mean {short_repr(url[2])}?"
            )
        host, colon, port = address.rpartition(":")
        if ":" in host and "/" not in host and not (host.startswith("[") and host.endswith("]")):
            raise InvalidArgument(
                f"{source}: head_address must put an IPv6 address in brackets, "
                f"{short_repr(f'[{host}]:{port}')}; got {short_repr(address)}"
            )
        if not colon or not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            raise InvalidArgument(
                f"{source}: head_address must be HOST:PORT (a port from 1 to 65535), "
                f"comma-separated for several heads; got {short_repr(address)}"
            )


def _parse(f: dataclasses.Field[Any], value: Any, source: str) -> Any:
    kind: type[Any] = type(f.default)
    bad = InvalidArgument(f"{source}: {f.name} must be {kind.__name__}, got {short_repr(value)}")
    if kind is tuple:
        # A list of strings: a list in a file or a flag, os.pathsep-separated in the environment.
        items = [p for p in value.split(os.pathsep) if p] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(p, str) for p in items):
            raise InvalidArgument(f"{source}: {f.name} must be a list of strings, got {short_repr(value)}")
        return tuple(items)
    if isinstance(value, str) and kind is not str:
        try:
            if kind is bool:
                return {
                    "1": True,
                    "true": True,
                    "yes": True,
                    "on": True,
                    "0": False,
                    "false": False,
                    "no": False,
                    "off": False,
                }[value.strip().lower()]
            return kind(value.strip())
        except (KeyError, ValueError):
            raise bad from None
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if type(value) is not kind:
        raise bad
    return value
