"""In-memory twins of the remote seams in :mod:`shoal.types`, for tests.

No sockets, no processes, no real time unless a test asks for a delay:

- :class:`FakeReplicaClient` is a :class:`~shoal.types.ReplicaClient`. ``push``
  echoes its inputs (or calls a handler), can be held open by a gate
  (an ``asyncio.Event``) or a delay, can fail with ``Unavailable``, and records
  every request and how many ran at once. ``generate`` streams the prompt's words
  back (or what ``generator`` says), and can fail part way.
- :class:`FakeReplicas` is the ``address -> ReplicaClient`` factory a
  :class:`~shoal.scheduler.router.Router` takes; it keeps one fake per address.
- :class:`FakeSchedulerClient` is a :class:`~shoal.types.SchedulerClient` that
  records create and remove calls and can be made to fail.
- :class:`FakeSchedulers` is the ``(scheduler_id, address) -> SchedulerClient``
  factory a :class:`~shoal.head.node.HeadNode` takes.
- :class:`FakeHeadLink` is a :class:`~shoal.types.HeadLink`: it records registrations
  and health calls, answers ACK, NACK or an error as told, and serves routing tables a
  test pushes.
- :class:`FakeLauncher` is the :class:`~shoal.scheduler.supervisor.Launcher` a
  :class:`~shoal.scheduler.supervisor.ReplicaSupervisor` takes: it starts a
  :class:`FakeProcess` per replica, which exits when a test says so or when signalled.

Every fake is for one event loop and is not thread-safe.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from shoal.core import payload
from shoal.core.cluster import ReplicaReport
from shoal.core.payload import Tensors
from shoal.core.spec import DeploymentSpec
from shoal.errors import DeadlineExceeded, NotFound, ShoalError, Unavailable
from shoal.types import (
    Arrays,
    GenerateChunk,
    GenerateRequest,
    LoadReport,
    PingResult,
    ReplicaDescription,
    RoutingTable,
    SchedulerRegistration,
)

Handler = Callable[[Arrays], Arrays]
TextHandler = Callable[[GenerateRequest], list[str]]


def echo(inputs: Arrays) -> Arrays:
    """The default handler: every input comes back as an output of the same name."""
    return dict(inputs)


def fake_generation(request: GenerateRequest) -> list[str]:
    """The default text generator: the prompt's words (a chat's last message's), one piece
    each (``" word"``), up to ``max_tokens`` (16 when 0)."""
    prompt = request.messages[-1].content if request.messages else request.prompt
    return [f" {word}" for word in prompt.split()][: request.max_tokens or 16]


@dataclass(frozen=True)
class GenerateCall:
    """One generation a :class:`FakeReplicaClient` received."""

    request_id: str
    request: GenerateRequest
    timeout_s: float


@dataclass(frozen=True)
class PushCall:
    """One request a :class:`FakeReplicaClient` received."""

    request_id: str
    inputs: Arrays
    timeout_s: float
    model_id: str = ""  # multiplexed deployments
    classify: dict[str, int] = field(default_factory=dict)  # output -> k asked for


class FakeReplicaClient:
    """A replica in memory.

    ``push`` records the call, then waits ``delay_s`` seconds and for ``gate`` (when
    given) to be set, then returns ``handler(inputs)``. It honours ``timeout_s``
    (``DeadlineExceeded``) and raises ``error`` when set, both when the call
    arrives and when it is released. A closed client raises ``Unavailable``, and
    ``close`` fails the calls waiting at once, as the gRPC client does.
    """

    def __init__(
        self,
        address: str = "fake-replica",
        *,
        handler: Handler = echo,
        delay_s: float = 0.0,
        gate: asyncio.Event | None = None,
        state: str = "READY",
    ) -> None:
        self.address = address
        self.handler = handler
        self.delay_s = delay_s
        self.gate = gate
        self.state = state
        self.error: ShoalError | None = None
        self.requests: list[PushCall] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.description = ReplicaDescription()
        self.generator: TextHandler = fake_generation
        self.generations: list[GenerateCall] = []
        self.fail_after_chunks: int | None = None
        self.piece_delay_s = 0.0
        self.streams_closed = 0
        self.drains: list[float] = []
        self.closed = False
        self._arrived = asyncio.Condition()
        self._closed = asyncio.Event()

    def fail(self, error: ShoalError | None = None) -> None:
        """Make every call (and every pending ``push`` once released) raise ``error``.

        The default is ``Unavailable``, as when the replica cannot be reached.
        """
        self.error = error or Unavailable(f"replica at {self.address} is unreachable")

    def recover(self) -> None:
        """Undo :meth:`fail`."""
        self.error = None

    async def wait_for_requests(self, count: int, timeout_s: float = 2.0) -> None:
        """Wait until ``count`` requests have arrived in total; ``TimeoutError`` otherwise."""
        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)

    async def ping(self, timeout_s: float) -> PingResult:
        self._check()
        return PingResult(self.state, self.in_flight, 0)

    async def push(
        self,
        request_id: str,
        inputs: Tensors,
        timeout_s: float,
        *,
        model_id: str = "",
        classify: Mapping[str, int] | None = None,
    ) -> Tensors:
        self._check()
        arrays = payload.to_arrays(inputs)  # a real replica decodes here too
        self.requests.append(PushCall(request_id, arrays, timeout_s, model_id, dict(classify or {})))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with self._arrived:
                self._arrived.notify_all()
            await self._hold(request_id, timeout_s)
            self._check()
            return payload.from_arrays(self.handler(arrays))
        finally:
            self.in_flight -= 1

    async def generate(
        self, request_id: str, request: GenerateRequest, timeout_s: float
    ) -> AsyncGenerator[GenerateChunk, None]:
        """Records the call, waits like ``push`` (``delay_s``, ``gate``), then yields the pieces
        ``generator(request)`` gives, ``piece_delay_s`` apart (all in one chunk without
        ``request.stream``), and a last chunk: ``finish_reason`` ``length`` when the pieces
        reached ``max_tokens``, else ``stop``; prompt tokens are the prompt's words.

        With ``fail_after_chunks`` set, raises ``Unavailable`` after that many chunks (0:
        before the first), as a replica that dies mid-stream. Counts the streams its consumer
        closed before their end in ``streams_closed``; counts toward ``in_flight``.
        """
        self._check()
        self.generations.append(GenerateCall(request_id, request, timeout_s))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        finished = False
        sent = 0
        try:
            async with self._arrived:
                self._arrived.notify_all()
            pieces = self.generator(request)
            chunks = [GenerateChunk(text=p) for p in pieces] if request.stream else []
            prompt = " ".join(m.content for m in request.messages) if request.messages else request.prompt
            chunks.append(
                GenerateChunk(
                    text="" if request.stream else "".join(pieces),
                    finish_reason="length" if len(pieces) >= (request.max_tokens or 16) else "stop",
                    prompt_tokens=len(prompt.split()),
                    completion_tokens=len(pieces),
                )
            )
            await self._hold(request_id, timeout_s)
            for chunk in chunks:
                if self.fail_after_chunks is not None and sent >= self.fail_after_chunks:
                    raise Unavailable(f"replica at {self.address} went away during {request_id}")
                self._check()
                if sent and self.piece_delay_s > 0:
                    await asyncio.sleep(self.piece_delay_s)
                yield chunk
                sent += 1
            finished = True
        finally:
            self.in_flight -= 1
            if not finished:
                self.streams_closed += 1

    async def describe(self, timeout_s: float) -> ReplicaDescription:
        """Returns ``description`` (set it to what the model should declare)."""
        self._check()
        return self.description

    async def drain(self, grace_s: float) -> None:
        self._check()
        self.drains.append(grace_s)
        self.state = "DRAINING"

    async def close(self) -> None:
        self.closed = True
        self._closed.set()

    async def _hold(self, request_id: str, timeout_s: float) -> None:
        """Wait ``delay_s`` and for ``gate``, up to ``timeout_s``; cut short by ``close``."""
        if self.delay_s <= 0 and self.gate is None:
            return
        held = asyncio.ensure_future(self._held())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait({held, closed}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise DeadlineExceeded(f"request {request_id} timed out after {timeout_s:g}s") from None
        finally:
            held.cancel()
            closed.cancel()
            await asyncio.gather(held, closed, return_exceptions=True)

    async def _held(self) -> None:
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        if self.gate is not None:
            await self.gate.wait()

    def _check(self) -> None:
        if self.closed:
            raise Unavailable(f"client for replica at {self.address} is closed")
        if self.error is not None:
            raise self.error


class FakeReplicas:
    """A ``Router`` client factory: one :class:`FakeReplicaClient` per address.

    ``client(address)`` returns (creating if needed) the fake the router will get for
    that address, so a test can set a gate or a failure before the router uses it.
    New fakes take ``handler``, ``delay_s`` and ``gate`` from this factory.
    """

    def __init__(
        self, *, handler: Handler = echo, delay_s: float = 0.0, gate: asyncio.Event | None = None
    ) -> None:
        self.handler = handler
        self.delay_s = delay_s
        self.gate = gate
        self.clients: dict[str, FakeReplicaClient] = {}

    def client(self, address: str) -> FakeReplicaClient:
        fake = self.clients.get(address)
        if fake is None:
            fake = FakeReplicaClient(address, handler=self.handler, delay_s=self.delay_s, gate=self.gate)
            self.clients[address] = fake
        return fake

    def __call__(self, address: str) -> FakeReplicaClient:
        return self.client(address)


class FakeSchedulerClient:
    """A scheduler in memory: records what the head asks of it.

    ``create_replica`` bumps and returns ``registry_version`` like a real scheduler.
    Set ``create_error`` / ``remove_error`` to make those calls raise.
    """

    def __init__(self, scheduler_id: str, address: str) -> None:
        self.scheduler_id = scheduler_id
        self.address = address
        self.registry_version = 0
        self.created: list[tuple[str, DeploymentSpec]] = []
        self.removed: list[tuple[str, bool]] = []
        self.create_error: ShoalError | None = None
        self.remove_error: ShoalError | None = None
        self.logs: dict[str, bytes] = {}
        self.closed = False

    @property
    def created_ids(self) -> list[str]:
        """Ids of the replicas created so far, in order."""
        return [rid for rid, _ in self.created]

    async def create_replica(self, replica_id: str, spec: DeploymentSpec) -> int:
        if self.create_error is not None:
            raise self.create_error
        self.registry_version += 1
        self.created.append((replica_id, spec))
        return self.registry_version

    async def remove_replica(self, replica_id: str, graceful: bool) -> None:
        if self.remove_error is not None:
            raise self.remove_error
        self.registry_version += 1
        self.removed.append((replica_id, graceful))

    async def read_log(self, replica_id: str, tail_bytes: int, follow: bool) -> AsyncIterator[bytes]:
        """The last ``tail_bytes`` of ``logs[replica_id]``; NotFound for a replica without one."""
        if replica_id not in self.logs:
            raise NotFound(f"no log for replica {replica_id!r} on scheduler {self.scheduler_id}")
        log = self.logs[replica_id]
        yield log[max(0, len(log) - tail_bytes) :]

    async def close(self) -> None:
        self.closed = True


class FakeSchedulers:
    """A ``HeadNode`` client factory: one :class:`FakeSchedulerClient` per scheduler.

    The head gets the same fake for a scheduler until it closes it or the
    scheduler's address changes. ``client(scheduler_id, address)`` returns (creating
    if needed) that fake, so a test can make its calls fail before the head uses it.
    """

    def __init__(self) -> None:
        self.clients: dict[str, FakeSchedulerClient] = {}

    def client(self, scheduler_id: str, address: str) -> FakeSchedulerClient:
        fake = self.clients.get(scheduler_id)
        if fake is None or fake.closed or fake.address != address:
            fake = FakeSchedulerClient(scheduler_id, address)
            self.clients[scheduler_id] = fake
        return fake

    def __call__(self, scheduler_id: str, address: str) -> FakeSchedulerClient:
        return self.client(scheduler_id, address)


# ---------------------------------------------------------------------- the head, for a scheduler


@dataclass(frozen=True)
class HealthCall:
    """One health update a :class:`FakeHeadLink` received, and how it answered."""

    scheduler_id: str
    registry_version: int
    replicas: tuple[ReplicaReport, ...]
    load: Mapping[str, LoadReport]
    answer: str  # "ack", "nack" or "error"
    routes_version: int = 0


class FakeHeadLink:
    """The head in memory, as a scheduler sees it (a :class:`~shoal.types.HeadLink`).

    ``register`` records the registration and returns ``interval_s``; ``health`` records the
    call and answers ACK, or NACK while ``nack`` is set. :meth:`fail` makes both raise
    (``Unavailable`` by default) until :meth:`recover`. ``watch_routes`` yields the tables a
    test passes to :meth:`push_table`. :meth:`wait_until` waits for a condition on what was
    received, so a test never sleeps hoping for it.
    """

    def __init__(self, *, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.nack = False
        self.error: ShoalError | None = None
        self.registrations: list[SchedulerRegistration] = []
        self.health_calls: list[HealthCall] = []
        self.closed = False
        self._tables: asyncio.Queue[RoutingTable] = asyncio.Queue()
        self._changed = asyncio.Condition()

    def fail(self, error: ShoalError | None = None) -> None:
        """Make every call raise ``error`` (default ``Unavailable``: the head is unreachable)."""
        self.error = error or Unavailable("the head is unreachable")

    def recover(self) -> None:
        """Undo :meth:`fail`."""
        self.error = None

    @property
    def acked(self) -> list[HealthCall]:
        """The health calls answered ACK, in order."""
        return [c for c in self.health_calls if c.answer == "ack"]

    def exit_reasons(self) -> dict[str, str]:
        """Replica id -> the exit reason (DEAD or STOPPED report) of every replica whose end
        reached the head in an acknowledged health call."""
        return {r.id: r.message for c in self.acked for r in c.replicas if r.state in ("DEAD", "STOPPED")}

    async def wait_until(self, condition: Callable[[FakeHeadLink], bool], timeout_s: float = 2.0) -> None:
        """Wait until ``condition(self)`` holds after some call; ``TimeoutError`` otherwise."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: condition(self))

    async def register(self, reg: SchedulerRegistration) -> float:
        if self.error is not None:
            await self._record()
            raise self.error
        self.registrations.append(reg)
        await self._record()
        return self.interval_s

    async def health(
        self,
        scheduler_id: str,
        registry_version: int,
        replicas: list[ReplicaReport],
        load: Mapping[str, LoadReport],
        routes_version: int = 0,
    ) -> bool:
        answer = "error" if self.error is not None else "nack" if self.nack else "ack"
        self.health_calls.append(
            HealthCall(scheduler_id, registry_version, tuple(replicas), dict(load), answer, routes_version)
        )
        await self._record()
        if self.error is not None:
            raise self.error
        return answer == "ack"

    def push_table(self, table: RoutingTable) -> None:
        """Hand ``table`` to the scheduler's ``watch_routes`` stream."""
        self._tables.put_nowait(table)

    async def watch_routes(self, scheduler_id: str) -> AsyncIterator[RoutingTable]:
        while True:
            yield await self._tables.get()

    async def close(self) -> None:
        self.closed = True

    async def _record(self) -> None:
        await asyncio.sleep(0)  # a real call always lets other tasks run
        async with self._changed:
            self._changed.notify_all()


# ---------------------------------------------------------------------- replica processes


class FakeProcess:
    """A replica process that runs until a test ends it (:meth:`exit`) or it is signalled:
    SIGKILL ends it at once (code -9); SIGTERM too (-15) unless ``stubborn``."""

    _pids = itertools.count(40000)

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.pid = next(self._pids)
        self.returncode: int | None = None
        self.signals: list[int] = []
        self.stubborn = False
        self.status_known = True
        self._exited = asyncio.Event()

    @property
    def replica_id(self) -> str:
        """The ``--replica-id`` it was started with."""
        return self.argv[self.argv.index("--replica-id") + 1]

    def exit(self, code: int, output: str = "", *, by_its_model: bool = False) -> None:
        """End the process with ``code`` (negative: killed by that signal), having written
        ``output`` to its log first. With status 0 it stopped of its own accord, as a replica
        does (its ``--stopping-file`` made), unless ``by_its_model`` (``os._exit(0)``)."""
        if self.returncode is not None:
            return
        if output:
            with open(self.log_path, "a") as f:
                f.write(output)
        if code == 0 and not by_its_model and "--stopping-file" in self.argv:
            Path(self.argv[self.argv.index("--stopping-file") + 1]).write_text("asked to stop")
        self.returncode = code
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        self.signals.append(sig)
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and not self.stubborn):
            self.exit(-sig)


@dataclass
class FakeLauncher:
    """Starts a :class:`FakeProcess` for each launch; ``processes`` by replica id, in order."""

    processes: dict[str, FakeProcess] = field(default_factory=dict)

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str], out: IO[bytes]) -> FakeProcess:
        process = FakeProcess(argv, env, Path(out.name))
        self.processes[process.replica_id] = process
        return process

    def process(self, replica_id: str) -> FakeProcess:
        return self.processes[replica_id]
