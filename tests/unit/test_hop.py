"""The local hop (shoal.rpc.hop): real Unix sockets, one event loop, a replica side that
echoes. What the router relies on: every request gets its own outcome, and a broken
connection fails each waiting request once with Unavailable (so it is retried elsewhere)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import DeadlineExceeded, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.rpc import hop
from shoal.rpc.hop import SWEEP_AFTER_S, HopClient, HopServer, hop_dir, release_hop_dir, socket_path

pytestmark = pytest.mark.timeout(30)

MAX = 1 << 20


def _task(i: int, data: bytes = b"\x00" * 64) -> pb.Task:
    return pb.Task(
        request_id=f"r{i}",
        timeout_s=5.0,
        inputs=[pb.Tensor(name="x", datatype="UINT8", shape=[len(data)], data=data)],
    )


async def _echo(task: pb.Task) -> pb.TaskOutcome:
    await asyncio.sleep(0)
    return pb.TaskOutcome(request_id=task.request_id, tag=task.tag, outputs=task.inputs)


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    made = hop_dir(tmp_path / "state")
    yield made
    for left in made.glob("*.sock"):
        left.unlink()
    release_hop_dir(made)  # in the temporary directory when tmp_path is long (xdist)


async def test_every_request_gets_its_own_answer(folder: Path) -> None:
    path = socket_path(folder, "127.0.0.1:5000")
    server = HopServer(path, _echo, MAX)
    await server.start()
    client = HopClient(path, "127.0.0.1:5000", MAX)
    try:
        payloads = [os.urandom(n) for n in (0, 1, 100, 70_000, 300_000)] * 20
        outcomes = await asyncio.gather(*(client.push(_task(i, p), 5.0) for i, p in enumerate(payloads)))
        for i, (p, o) in enumerate(zip(payloads, outcomes, strict=True)):
            assert o.request_id == f"r{i}"
            assert o.outputs[0].data == p
    finally:
        await client.close()
        await server.stop()
    assert not path.exists()


def test_the_hop_folder_is_private_and_socket_paths_fit(tmp_path: Path) -> None:
    folder = hop_dir(tmp_path / "state")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    deep = tmp_path / ("d" * 80) / ("e" * 80) / "state"
    other = hop_dir(deep)
    assert stat.S_IMODE(other.stat().st_mode) == 0o700
    assert len(str(socket_path(other, "255.255.255.255:65535"))) <= 100
    assert hop_dir(deep) == other  # one folder per state folder
    # At the scheduler's exit the folder in the temporary directory goes, unless a replica
    # still listens in it; one under the state folder stays with the state.
    left = other / "127.0.0.1_5001.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(left))
        live.listen(1)
        release_hop_dir(other)
        assert left.exists() and other.exists()
    # Its replica is gone (closed without removing its socket, as a killed one does).
    assert left.exists()
    release_hop_dir(other)
    assert not other.exists()
    release_hop_dir(folder)
    kept = tmp_path / "short"
    (kept / "hop").mkdir(parents=True)
    stale = kept / "hop" / "127.0.0.1_5002.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))
    release_hop_dir(kept / "hop")
    assert (kept / "hop").exists() and not stale.exists()


def test_a_restarted_scheduler_clears_the_sockets_its_killed_replicas_left(tmp_path: Path) -> None:
    folder = hop_dir(tmp_path / "state")
    stale, live_path = folder / "127.0.0.1_5003.sock", folder / "127.0.0.1_5004.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(live_path))
        live.listen(1)
        assert hop_dir(tmp_path / "state") == folder
        assert not stale.exists() and live_path.exists()
    live_path.unlink()
    release_hop_dir(folder)


@pytest.fixture
def temp_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary directory of the test's own, short enough for socket paths."""
    root = Path(tempfile.mkdtemp(prefix="h", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _aged(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_a_scheduler_start_sweeps_the_hop_folders_killed_schedulers_left(temp_root: Path) -> None:
    uid = os.getuid()
    # What a scheduler killed with its replicas (-9) leaves: its folder, their sockets.
    killed = temp_root / f"shoal-hop-{uid}-{'a' * 16}"
    killed.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(killed / "127.0.0.1_5005.sock"))
    _aged(killed / "127.0.0.1_5005.sock", 2 * SWEEP_AFTER_S)
    _aged(killed, 2 * SWEEP_AFTER_S)
    # A live scheduler's folder, as old, whose replica listens; and one just emptied.
    busy = temp_root / f"shoal-hop-{uid}-{'b' * 16}"
    busy.mkdir(mode=0o700)
    fresh = temp_root / f"shoal-hop-{uid}-{'c' * 16}"
    fresh.mkdir(mode=0o700)
    # Another user's name: not this user's to judge.
    foreign = temp_root / f"shoal-hop-{uid + 1}-{'d' * 16}"
    foreign.mkdir(mode=0o700)
    _aged(foreign, 2 * SWEEP_AFTER_S)
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(busy / "127.0.0.1_5006.sock"))
        live.listen(1)
        _aged(busy / "127.0.0.1_5006.sock", 2 * SWEEP_AFTER_S)
        _aged(busy, 2 * SWEEP_AFTER_S)

        mine = hop_dir(temp_root / ("s" * 100) / "state")  # a long state path: a folder in temp_root

        assert mine.parent == temp_root and mine.exists()
        assert not killed.exists()
        assert (busy / "127.0.0.1_5006.sock").exists()
        assert fresh.exists() and foreign.exists()
    # A socket bound a moment ago refuses until its replica listens: it is not taken as dead.
    with socket.socket(socket.AF_UNIX) as binding:
        binding.bind(str(busy / "127.0.0.1_5007.sock"))
        _aged(busy, 2 * SWEEP_AFTER_S)
        hop_dir(temp_root / ("t" * 100) / "state")
        assert (busy / "127.0.0.1_5007.sock").exists()


def test_one_start_sweeps_a_bounded_number_of_folders(
    temp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hop, "SWEEP_MAX", 3)
    left = [temp_root / f"shoal-hop-{os.getuid()}-{i:016x}" for i in range(5)]
    for folder in left:
        folder.mkdir(mode=0o700)
        _aged(folder, 2 * SWEEP_AFTER_S)
    hop_dir(temp_root / ("u" * 100) / "state")
    assert sum(f.exists() for f in left) == 2  # the next start takes the rest
    hop_dir(temp_root / ("v" * 100) / "state")
    assert not any(f.exists() for f in left)


async def test_a_replica_makes_its_hop_folder_again_if_it_was_swept(temp_root: Path) -> None:
    folder = temp_root / f"shoal-hop-{os.getuid()}-{'e' * 16}"
    path = socket_path(folder, "127.0.0.1:5008")
    server = HopServer(path, _echo, MAX)
    await server.start()
    client = HopClient(path, "127.0.0.1:5008", MAX)
    try:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert (await client.push(_task(1), 5.0)).request_id == "r1"
    finally:
        await client.close()
        await server.stop()


async def test_a_dead_replica_fails_waiting_requests_at_once_with_unavailable(folder: Path) -> None:
    path = socket_path(folder, "127.0.0.1:5001")
    started = asyncio.Event()

    async def stuck(task: pb.Task) -> pb.TaskOutcome:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    server = HopServer(path, stuck, MAX)
    await server.start()
    client = HopClient(path, "127.0.0.1:5001", MAX)
    try:
        waiting = [asyncio.create_task(client.push(_task(i), 30.0)) for i in range(5)]
        await started.wait()
        await server.stop()  # what the kernel does when the replica process dies
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5.0)
        assert all(isinstance(r, Unavailable) for r in results), results
        # Nobody listens any more: the next request fails at once, to be retried elsewhere.
        with pytest.raises(Unavailable, match="cannot connect"):
            await client.push(_task(9), 5.0)
        # The replica's address is taken again (a new replica): the client reconnects.
        again = HopServer(path, _echo, MAX)
        await again.start()
        try:
            assert (await client.push(_task(10), 5.0)).request_id == "r10"
        finally:
            await again.stop()
    finally:
        await client.close()


async def test_an_oversized_or_garbled_frame_closes_only_that_connection(folder: Path) -> None:
    path = socket_path(folder, "127.0.0.1:5002")
    server = HopServer(path, _echo, 1000)
    await server.start()
    good = HopClient(path, "127.0.0.1:5002", MAX)
    try:
        await good.push(_task(1), 5.0)
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write((10**6).to_bytes(4, "little") + b"x" * 100)  # over the replica's limit
        assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed by the replica
        writer.close()
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write((5).to_bytes(4, "little") + b"\xff" * 5)  # not a Task
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
        writer.close()
        # Too big for the replica: this request fails, the connection is closed, the next works.
        with pytest.raises(Unavailable):
            await good.push(_task(2, b"y" * 5000), 5.0)
        assert (await good.push(_task(3), 5.0)).request_id == "r3"
    finally:
        await good.close()
        await server.stop()


async def test_a_slow_replica_gives_deadline_exceeded_and_the_next_request_works(folder: Path) -> None:
    path = socket_path(folder, "127.0.0.1:5003")

    async def slow_first(task: pb.Task) -> pb.TaskOutcome:
        if task.request_id == "r1":
            await asyncio.sleep(1.0)
        return await _echo(task)

    server = HopServer(path, slow_first, MAX)
    await server.start()
    client = HopClient(path, "127.0.0.1:5003", MAX)
    try:
        with pytest.raises(DeadlineExceeded):
            await client.push(_task(1), 0.1)
        assert (await client.push(_task(2), 5.0)).request_id == "r2"
        await asyncio.sleep(1.0)  # the late answer to r1 arrives and is dropped
        assert not client.pending
    finally:
        await client.close()
        await server.stop()


async def test_close_fails_pending_requests(folder: Path) -> None:
    path = socket_path(folder, "127.0.0.1:5004")
    server = HopServer(path, lambda t: asyncio.Event().wait(), MAX)  # type: ignore[arg-type,return-value]
    await server.start()
    client = HopClient(path, "127.0.0.1:5004", MAX)
    try:
        waiting = asyncio.create_task(client.push(_task(1), 30.0))
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(Unavailable, match="client closed"):
            await waiting
        with pytest.raises(Unavailable):
            await client.push(_task(2), 5.0)
    finally:
        await server.stop()


async def test_arbitrary_bytes_never_stop_the_replica_side(folder: Path) -> None:
    """Whatever a local process writes to the socket, the replica side closes that
    connection or answers, and keeps serving its scheduler."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    path = socket_path(folder, "127.0.0.1:5005")
    server = HopServer(path, _echo, 4096)
    await server.start()
    client = HopClient(path, "127.0.0.1:5005", MAX)
    loop = asyncio.get_running_loop()
    blobs: list[bytes] = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.binary(max_size=200)
        | st.builds(
            lambda n, b: n.to_bytes(4, "little") + b, st.integers(0, 2**32 - 1), st.binary(max_size=64)
        )
    )
    def collect(raw: bytes) -> None:
        blobs.append(raw)

    collect()
    try:
        for raw in blobs:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(raw)
            writer.write_eof()
            with_timeout = asyncio.wait_for(reader.read(), 5.0)
            await with_timeout  # answered (a valid task) or closed: never left hanging
            writer.close()
            assert (await client.push(_task(1), 5.0)).request_id == "r1"
        assert loop.is_running()
    finally:
        await client.close()
        await server.stop()


async def test_a_lone_frame_goes_out_at_once_and_the_rest_of_its_turn_together_after_it() -> None:
    """The writer sends the first frame of a loop turn at once when it is alone (nothing
    else pending), the others of that turn in one write after it: order kept."""
    from shoal.rpc.hop import _Frames, _Writer

    class Transport:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def is_closing(self) -> bool:
            return False

    lone = Transport()
    writer = _Writer(lone, eager=lambda: True)  # type: ignore[arg-type]
    writer.send(b"first")
    assert len(lone.writes) == 1  # at once, not at the end of the turn
    writer.send(b"second")
    writer.send(b"third")
    await asyncio.sleep(0)
    assert len(lone.writes) == 2
    assert _Frames(MAX).feed(b"".join(lone.writes)) == [b"first", b"second", b"third"]

    busy = Transport()
    writer = _Writer(busy, eager=lambda: False)  # type: ignore[arg-type]
    writer.send(b"a")
    writer.send(b"b")
    assert busy.writes == []  # frames that go together leave together, at the end of the turn
    await asyncio.sleep(0)
    assert len(busy.writes) == 1 and _Frames(MAX).feed(busy.writes[0]) == [b"a", b"b"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([0, 1, 5, 4096, 200_000, 262_140, 262_141, 700_000]), min_size=1, max_size=8),
    st.lists(st.integers(min_value=1, max_value=300_000), min_size=1, max_size=40),
)
def test_frames_come_out_whole_however_the_stream_is_cut(sizes: list[int], cuts: list[int]) -> None:
    """Reads of any length, straight into the reader's buffers: every frame comes out whole
    and in order, small ones through the shared buffer, larger ones (over 256 KiB with
    their header) read into a buffer of their own."""
    from shoal.rpc.hop import _HEADER, _Frames

    frames = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    stream = b"".join(_HEADER.pack(len(f)) + f for f in frames)
    reader = _Frames(1 << 20)
    got: list[bytes | bytearray] = []
    at, i = 0, 0
    while at < len(stream):
        room = reader.get_buffer()
        assert len(room) > 0
        # Cut as drawn for 20,000 reads, then as large as the reader takes: 5.6 MB in 1-byte
        # reads took over the test's 30 s on a loaded machine.
        cut = cuts[i % len(cuts)] if i < 20_000 else len(room)
        n = min(len(room), cut, len(stream) - at)
        room[:n] = stream[at : at + n]
        at += n
        i += 1
        got += reader.updated(n)
    assert [bytes(g) for g in got] == frames


def test_a_frame_over_the_limit_is_refused_from_its_header() -> None:
    from shoal.rpc.hop import _HEADER, _Frames

    with pytest.raises(ValueError, match="over the limit"):
        _Frames(1000).feed(_HEADER.pack(1001) + b"x")


async def test_a_push_its_caller_cancels_is_dropped_by_the_replica(folder: Path) -> None:
    """A request whose client went away is cancelled on the replica's side too (a ``cancel``
    frame with its tag), rather than computed for nobody; the others on the connection go on."""
    path = socket_path(folder, "127.0.0.1:5000")
    release = asyncio.Event()
    started: list[str] = []
    dropped: list[str] = []

    async def held(task: pb.Task) -> pb.TaskOutcome:
        started.append(task.request_id)
        try:
            await release.wait()
        except asyncio.CancelledError:
            dropped.append(task.request_id)
            raise
        return pb.TaskOutcome(request_id=task.request_id, tag=task.tag, outputs=task.inputs)

    server = HopServer(path, held, MAX)
    await server.start()
    client = HopClient(path, "127.0.0.1:5000", MAX)
    try:
        kept = asyncio.create_task(client.push(_task(0), 5.0))
        gone = asyncio.create_task(client.push(_task(1), 5.0))
        async with asyncio.timeout(5):
            while len(started) < 2:
                await asyncio.sleep(0.01)
        gone.cancel()
        async with asyncio.timeout(5):
            while not dropped:
                await asyncio.sleep(0.01)
        assert dropped == ["r1"]
        release.set()
        assert (await kept).request_id == "r0"
        with pytest.raises(asyncio.CancelledError):
            await gone
        # A cancel for a task already answered (or unknown) is nothing to the replica.
        client_proto = client._proto
        assert client_proto is not None and client_proto.writer is not None
        client_proto.writer.send(pb.Task(tag=12345, cancel=True).SerializeToString())
        assert (await client.push(_task(2), 5.0)).request_id == "r2"
    finally:
        await client.close()
        await server.stop()
