"""The Python API's pieces that need no cluster: ``@shoal.deployment`` as a thin layer over the
spec, input typing, and ``import shoal`` staying cheap."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import shoal
import shoal.errors as errors_module
from shoal.api import to_arrays
from shoal.config import Settings
from shoal.core.spec import Batching, parse_spec
from shoal.decorator import is_target, load_target, spec_of
from shoal.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    HeadSilent,
    HeadUnreachable,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)

pytestmark = pytest.mark.timeout(30)


@shoal.deployment(replicas=2, batching=Batching(max_batch_size=8, max_delay_ms=2), options={"k": 1})
class MyModel:
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return inputs


class Plain:
    pass


def test_a_decorated_class_is_the_spec_a_yaml_file_would_give() -> None:
    spec = spec_of(MyModel)
    here = Path(__file__).resolve()
    # This module is tests.unit.test_api: replicas import it from the folder above tests/.
    assert spec == parse_spec(
        {
            "name": "my-model",
            "backend": "python",
            "model": "tests.unit.test_api:MyModel",
            "base_dir": str(here.parents[2]),
            "replicas": 2,
            "batching": {"max_batch_size": 8, "max_delay_ms": 2},
            "options": {"k": 1},
        }
    )
    assert spec_of(Plain).name == "plain" and spec_of(Plain).replicas == 1
    assert spec_of(spec) is spec
    assert spec_of({"name": "a", "backend": "sklearn", "model": "m.joblib"}).name == "a"

    @dataclasses.dataclass
    class Mine:
        name: str = "b"
        backend: str = "sklearn"
        model: str = "m.joblib"
        replicas: int = 2

    assert spec_of(Mine()) == parse_spec(
        {"name": "b", "backend": "sklearn", "model": "m.joblib", "replicas": 2}
    )


def test_a_bad_field_is_refused_where_the_decorator_is_written() -> None:
    with pytest.raises(InvalidArgument, match="replicas"):
        shoal.deployment(replicas=-1)(Plain)
    with pytest.raises(InvalidArgument, match="wat"):
        shoal.deployment(wat=1)(Plain)


def test_classes_replicas_cannot_import_are_refused_with_the_reason() -> None:
    def inner() -> type:
        class Local:
            pass

        return Local

    with pytest.raises(InvalidArgument, match="top level"):
        spec_of(inner())
    notebook = types.ModuleType("__notebook__")  # no __file__, as a Jupyter cell's class
    cls = type("Cell", (), {"__module__": notebook.__name__})
    sys.modules[notebook.__name__] = notebook
    try:
        with pytest.raises(InvalidArgument, match="not defined in a module file"):
            spec_of(cls)
    finally:
        del sys.modules[notebook.__name__]
    with pytest.raises(InvalidArgument, match="cannot deploy a int"):
        spec_of(3)
    # Before, a YAML file's path was refused with no word of how to deploy a file.
    with pytest.raises(InvalidArgument) as err:
        spec_of("examples/echo.yaml")
    assert str(err.value) == (
        "cannot deploy a str: give a DeploymentSpec, a mapping or a class (for a file, run "
        "'shoal deploy FILE', or give the mapping yaml.safe_load reads from it, or the class itself)"
    )


def test_deploy_targets_name_a_file_and_a_class(tmp_path: Path) -> None:
    assert is_target("app.py:Model") and is_target("dir/my_app.py:M2")
    assert not is_target("app.yaml") and not is_target("app.py") and not is_target("app.py:a.b")
    with pytest.raises(InvalidArgument, match="no file"):
        load_target(str(tmp_path / "missing.py:Model"))
    (tmp_path / "shoal_unit_broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(InvalidArgument, match="RuntimeError: boom"):
        load_target(str(tmp_path / "shoal_unit_broken.py:Model"))
    assert "shoal_unit_broken" not in sys.modules
    # Before: shoal deploy ended with the script's own message (or argparse's usage) and status.
    (tmp_path / "shoal_unit_script.py").write_text("import sys\nsys.exit(2)\nclass Model: ...\n")
    with pytest.raises(InvalidArgument) as err:
        load_target(str(tmp_path / "shoal_unit_script.py:Model"))
    assert str(err.value) == (
        f"{tmp_path}/shoal_unit_script.py:Model: importing {tmp_path}/shoal_unit_script.py exited "
        "(sys.exit(2)); replicas import it too, so keep a script's own code under "
        "if __name__ == '__main__':"
    )
    assert "shoal_unit_script" not in sys.modules
    (tmp_path / "shoal_unit_app.py").write_text("X = 1\n")
    with pytest.raises(InvalidArgument, match="no class 'X'"):
        load_target(str(tmp_path / "shoal_unit_app.py:X"))


def test_inputs_are_typed_by_the_spec_and_ragged_lists_refused() -> None:
    spec = parse_spec(
        {"name": "a", "backend": "sklearn", "model": "m", "inputs": [{"name": "x", "datatype": "INT64"}]}
    )
    assert to_arrays({"x": [1, 2]}, spec)["x"].dtype == np.int64
    assert to_arrays({"y": [1.5]}, spec)["y"].dtype == np.float32
    assert to_arrays({"s": ["a"]})["s"].dtype == object
    kept = np.zeros(3, np.float16)
    assert to_arrays({"x": kept})["x"] is kept
    with pytest.raises(InvalidArgument, match="input 'x': ragged"):
        to_arrays({"x": [[1, 2], [3]]})
    with pytest.raises(InvalidArgument, match="mapping of input names"):
        to_arrays({})


def test_object_arrays_of_strings_are_bytes_and_other_objects_are_named() -> None:
    """A pandas string column (``df["text"].to_numpy()``) is an object array of str. Before,
    it was refused as 'ragged nested lists', and so were None, an object of no tensor type
    and a mixed object array, none of which is ragged; an input named by an int ended in
    protobuf's TypeError ('bad argument type for built-in operation')."""
    texts = np.array(["a", "bé"], dtype=object)
    assert to_arrays({"s": texts})["s"].tolist() == [b"a", "bé".encode()]
    spec = parse_spec(
        {"name": "a", "backend": "sklearn", "model": "m", "inputs": [{"name": "x", "datatype": "FP32"}]}
    )
    assert to_arrays({"x": np.array([1.5, 2], dtype=object)}, spec)["x"].dtype == np.float32
    refusals: list[tuple[object, str]] = [
        (np.array(["a", 1, None], dtype=object), "input 's': BYTES element 1 is 1, not a string"),
        (None, "input 's': BYTES element 0 is None, not a string"),
        (Plain(), "input 's': BYTES element 0 is <"),
    ]
    for value, message in refusals:
        with pytest.raises(InvalidArgument) as err:
            to_arrays({"s": value})
        assert str(err.value).startswith(message)
    with pytest.raises(InvalidArgument, match=r"^input names must be strings, got 1$"):
        to_arrays({1: [1.0]})  # type: ignore[dict-item]


def test_import_shoal_does_not_import_grpc_until_a_call() -> None:
    code = (
        "import sys, shoal\n"
        "c = shoal.connect('127.0.0.1:1')\n"
        "print('grpc' in sys.modules, shoal.deployment is shoal.decorator.deployment)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_shoal_deploy_takes_a_file_and_class_as_well_as_yaml(tmp_path: Path) -> None:
    from shoal.cli.deploy import _specs_in

    (tmp_path / "shoal_unit_deploy_app.py").write_text(
        "import shoal\n\n\n@shoal.deployment(replicas=3)\nclass Model:\n    pass\n"
    )
    (specs, routes) = _specs_in(f"{tmp_path}/shoal_unit_deploy_app.py:Model")
    assert [(s.name, s.model, s.replicas, s.base_dir) for s in specs] == [
        ("model", "shoal_unit_deploy_app:Model", 3, str(tmp_path.resolve()))
    ]
    assert routes == []


# ------------------------------------------------------------------ a head that is not there


def _port_nobody_listens_on() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_head_that_is_not_running_is_named_with_how_to_start_one() -> None:
    """Before, ``shoal.connect(...).status()`` with no head ended in a raw ``Unavailable: failed
    to connect to all addresses ... Connection refused``, where the CLI says which head it
    looked for and how to start one."""
    address = f"127.0.0.1:{_port_nobody_listens_on()}"
    with shoal.connect(address) as c, pytest.raises(HeadUnreachable) as err:
        c.status()
    message = str(err.value)
    assert isinstance(err.value, Unavailable)
    assert message.startswith(f"cannot reach the head at {address} (")
    assert "is it running? Start one with 'shoal up'" in message
    assert "shoal.connect" in message and "SHOAL_HEAD" in message and "--head" not in message
    assert "If the cluster runs with TLS, give tls_dir" in message


async def test_the_async_client_says_the_same_and_so_does_the_cli() -> None:
    from shoal.cli import build_parser
    from shoal.cli.common import with_client

    address = f"127.0.0.1:{_port_nobody_listens_on()}"
    async with shoal.AsyncClient(address) as c:
        with pytest.raises(HeadUnreachable, match=r"cannot reach the head at .*; is it running\? Start one"):
            await c.scale("echo", 2)

    async def status(client: Any, settings: object) -> int:
        await client.status()
        return 0

    args = build_parser().parse_args(["--head", address, "status"])
    with pytest.raises(HeadUnreachable) as err:
        await asyncio.to_thread(with_client, args, status)
    # One message, in the CLI's words, not the API's wrapped in the CLI's.
    assert str(err.value).count("cannot reach the head") == 1
    assert "point --head / SHOAL_HEAD at it" in str(err.value) and "--tls-dir" in str(err.value)


def test_a_head_that_takes_connections_and_never_answers_is_named(silent_port: int) -> None:
    """Before, ``shoal.connect(...).status()`` and a handle's ``infer`` against such a head ended in
    a bare ``DeadlineExceeded: Deadline Exceeded``, naming no address (the CLI named it)."""
    address = f"127.0.0.1:{silent_port}"
    settings = Settings.load(env={}, flags={"head_address": address, "rpc_timeout_s": 0.5})
    with shoal.Client(shoal.AsyncClient(settings=settings)) as c:
        for call in (c.status, lambda: c.handle("echo").infer({"x": [[1.0]]})):
            with pytest.raises(HeadSilent) as err:
                call()
            assert isinstance(err.value, DeadlineExceeded)
            assert str(err.value).startswith(f"the head at {address} did not answer in time (")
            assert "give its address to shoal.connect" in str(err.value)


def test_an_argument_its_message_cannot_carry_is_invalid_before_anything_is_sent() -> None:
    """Before, each raised what protobuf raises, no ShoalError (``scale("echo", 2**40)``: a
    ValueError 'Value out of range'; ``1.5``: a TypeError), and ``deploy(..., timeout_s=nan)``
    waited for good. No head listens at port 1: the refusals come first."""
    spec = {"name": "a", "backend": "python", "model": "m:M"}
    with shoal.connect("127.0.0.1:1") as c:
        calls: list[tuple[Callable[[], object], str]] = [
            (
                lambda: c.scale("echo", 2**40),
                "replicas must be an integer from 0 to 2147483647, got 1099511627776",
            ),
            (
                lambda: c.scale("echo", 1.5),  # type: ignore[arg-type]
                "replicas must be an integer from 0 to 2147483647, got 1.5",
            ),
            (lambda: c.scale("echo", -1), "replicas must be an integer from 0 to 2147483647, got -1"),
            # Past the most replicas a deployment can have: a count it could never be at.
            (
                lambda: c.scale("echo", 2, if_replicas=-1),
                "if_replicas must be an integer from 0 to 1000, got -1",
            ),
            (
                lambda: c.scale("echo", 2, if_replicas=2**40),
                "if_replicas must be an integer from 0 to 1000, got 1099511627776",
            ),
            (
                lambda: c.rollback("echo", 2**31),
                "revision must be an integer from 0 to 2147483647, got 2147483648",
            ),
            (lambda: c.events("echo", limit=True), "limit must be an integer from 0 to 2147483647, got True"),
            (
                lambda: c.deploy(spec, timeout_s=math.nan),
                "timeout_s must be a finite number of seconds, 0 or more, got nan",
            ),
            (
                lambda: c.deploy(spec, min_ready_s=-1),
                "min_ready_s must be a finite number of seconds, 0 or more, got -1",
            ),
            # Before: protobuf's TypeError ('bad argument type for built-in operation'), or
            # for None the empty name ("no deployment named ''").
            (lambda: c.delete(5), "name must be a string, got 5"),  # type: ignore[arg-type]
            (lambda: c.scale(None, 1), "name must be a string, got None"),  # type: ignore[arg-type]
            (lambda: c.handle(None).infer({"x": [1.0]}), "name must be a string, got None"),  # type: ignore[arg-type]
            (lambda: c.status([1]), "only must be names of deployments, got [1]"),  # type: ignore[list-item]
        ]
        for call, message in calls:
            with pytest.raises(InvalidArgument) as err:
                call()
            assert str(err.value) == message


class _SchedulerGone:
    """A head that answers, and an Unavailable about something behind it (a scheduler)."""

    def __init__(self, address: str, settings: object) -> None:
        pass

    async def status(self) -> object:
        return object()

    async def scale(
        self, name: str, replicas: int, if_revision: int | None = None, if_replicas: int | None = None
    ) -> None:
        raise Unavailable("scheduler sched-1 is not reachable")

    async def close(self) -> None:
        pass


async def test_an_unavailable_behind_a_head_that_answers_is_left_as_it_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shoal.rpc.clients

    monkeypatch.setattr(shoal.rpc.clients, "ControlClient", _SchedulerGone)
    async with shoal.AsyncClient("127.0.0.1:1") as c:
        with pytest.raises(Unavailable) as err:
            await c.scale("echo", 2)
    assert not isinstance(err.value, HeadUnreachable)
    assert str(err.value) == "scheduler sched-1 is not reachable"


async def test_an_input_over_the_message_limit_is_refused_before_it_is_encoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, a 400 MB array was first copied into a protobuf message (the process grew by
    1.1 GB, for 1.4 s) and only then refused as over ``max_message_mb``. Its size is known
    from the arrays: nothing is encoded, nothing sent (no scheduler listens at port 9)."""
    from shoal.rpc import clients, codec

    def encode(field: object, arrays: object) -> None:
        raise AssertionError("the arrays were encoded")

    monkeypatch.setattr(codec, "fill_arrays", encode)
    native = clients.NativeClient("127.0.0.1:9", Settings(max_message_mb=1))
    try:
        with pytest.raises(ResourceExhausted) as err:
            await native.infer("echo", {"x": np.zeros(300_000, np.float32), "y": np.zeros(1, np.int64)})
    finally:
        await native.close()
    assert str(err.value) == (
        "the request to 'echo' is at least 1200008 bytes, over the limit of 1048576 (setting "
        "max_message_mb): send fewer rows per request, or raise the limit"
    )


# ------------------------------------------------------------------ the synchronous client's thread


def test_a_client_dropped_without_close_ends_its_thread() -> None:
    """Before, each ``shoal.connect(...)`` dropped without ``close()`` kept its loop's thread
    (and three descriptors) for good: 30 clients made in a loop, 30 threads and 90
    descriptors more. A handle keeps its client's loop: one made from a dropped client
    still works."""
    address = f"127.0.0.1:{_port_nobody_listens_on()}"
    before = set(threading.enumerate())

    def use_and_drop() -> None:
        c = shoal.connect(address)
        with pytest.raises(HeadUnreachable):
            c.status()

    for _ in range(5):
        use_and_drop()
    handle = shoal.connect(address).handle("echo")
    gc.collect()
    with pytest.raises(HeadUnreachable):
        handle.infer({"x": [1.0]})
    del handle
    gc.collect()
    for _ in range(100):  # each thread ends once its loop has closed its channels
        left = [t for t in threading.enumerate() if t not in before and t.name == "shoal-client"]
        if not left:
            break
        time.sleep(0.05)
    assert left == []


FORKED = """
import os, signal, sys
import shoal
import shoal.errors as errors_module
from shoal.errors import HeadUnreachable

c = shoal.connect({address!r})
try:
    c.status()
except HeadUnreachable:
    pass
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # before, the child's call waited for good
    for client in (c, shoal.connect({address!r})):
        try:
            client.status()
        except Exception as err:
            print(type(err).__name__, err, flush=True)
    c.close()
    print("closed", flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", type(c.aio).__name__, flush=True)
c.close()
"""


def test_a_client_in_a_forked_child_says_so_instead_of_hanging() -> None:
    """Before, a client used before ``os.fork`` (multiprocessing's default start method on
    Linux) waited for good in the child: its loop's thread is not there. A new client in
    the child crashed the child (SIGSEGV in gRPC). Each now says why and what to do."""
    address = f"127.0.0.1:{_port_nobody_listens_on()}"
    out = subprocess.run(
        [sys.executable, "-c", FORKED.format(address=address)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    refusal = (
        "FailedPrecondition this process was forked from one that had used a shoal.Client: gRPC "
        "cannot run in a forked child. Start worker processes with multiprocessing's 'spawn' or "
        "'forkserver' method, or make a client's first call in each child, none in the parent"
    )
    assert out.stdout.splitlines() == [refusal, refusal, "closed", "parent AsyncClient"], out.stderr


class _CountingNative:
    """A scheduler's client that answers its inputs and counts the calls."""

    def __init__(self) -> None:
        self.sent: list[dict[str, np.ndarray]] = []

    async def infer(self, name: str, arrays: dict[str, np.ndarray], **kw: object) -> object:
        self.sent.append(arrays)
        return arrays, "r-1"


async def test_inputs_the_deployment_does_not_take_are_refused_before_the_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, ``np.random.rand(2, 16)`` (float64) for an FP32 input, an unknown or missing
    input, another shape, and ``timeout_s="5"`` were each sent whole to a scheduler (the
    last ended in a TypeError from the comparison), to be refused there. The handle knows the
    spec: it checks as the scheduler would. It learns the spec again before refusing, in
    case the deployment changed its inputs since."""
    spec = parse_spec(
        {
            "name": "a",
            "backend": "python",
            "model": "m:M",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        }
    )
    native = _CountingNative()
    learned: list[str] = []
    async with shoal.AsyncClient("127.0.0.1:1") as c:
        handle = c.handle("a")

        async def learn() -> None:
            learned.append("a")
            handle._spec, handle._addresses = spec, ["127.0.0.1:9"]

        monkeypatch.setattr(handle, "_learn", learn)
        monkeypatch.setattr(c, "_native_client", lambda address: native)
        refusals: list[tuple[dict[str, Any], str]] = [
            ({"x": np.zeros((1, 2))}, "input 'x': expected datatype FP32, got FP64"),
            ({"x": np.zeros((1, 3), np.float32)}, "input 'x': expected shape [-1,2], got [1,3]"),
            ({"x": [[1.0, 2.0]], "z": [1.0]}, "unknown input 'z'; model 'a' takes 'x'"),
        ]
        for inputs, message in refusals:
            with pytest.raises(InvalidArgument) as err:
                await handle.infer(inputs)
            assert str(err.value) == message
        with pytest.raises(InvalidArgument, match=r"^timeout_s must be a number of seconds, got '5'$"):
            await handle.infer({"x": [[1.0, 2.0]]}, timeout_s="5")  # type: ignore[arg-type]
        assert native.sent == [] and learned == ["a", "a", "a"]
        assert (await handle.infer({"x": [[1.0, 2.0]]}))["x"].dtype == np.float32
    assert len(native.sent) == 1


INTERRUPTED = """
import asyncio, os, signal, threading
from shoal.api import AsyncClient, Client
from shoal.config import Settings

settings = Settings.load(env={{}}, flags={{"head_address": {address!r}, "rpc_timeout_s": 60}})
c = Client(AsyncClient(settings=settings))
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    c.status()
except KeyboardInterrupt:
    print("interrupted", flush=True)


async def left():
    for _ in range(100):
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if not tasks:
            break
        await asyncio.sleep(0.02)
    return sorted(t.get_coro().__qualname__ for t in tasks)


print(asyncio.run_coroutine_threadsafe(left(), c._loop._loop).result(), flush=True)
c.close()
"""


def test_ctrl_c_during_a_call_cancels_the_call(silent_port: int) -> None:
    """Ctrl-C (Jupyter's interrupt) ends the wait of a blocking call; before, the call itself
    ran on in the client's thread (``['AsyncHandle.infer', 'UnaryUnaryCall._invoke']``) and
    its replica held it in flight (``in_flight`` 1 in the status, 0 now) up to its deadline."""
    out = subprocess.run(
        [sys.executable, "-c", INTERRUPTED.format(address=f"127.0.0.1:{silent_port}")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.splitlines() == ["interrupted", "[]"], out.stderr


def test_an_async_client_serves_one_asyncio_run_after_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook or a script that runs each step with ``asyncio.run`` on one AsyncClient:
    gRPC binds a channel to the loop it was opened on, and before, every call after the
    first ``asyncio.run`` ended in 'RuntimeError: Event loop is closed', for good. No head
    or scheduler listens at these ports: each call gets as far as gRPC's answer."""
    head, scheduler = (f"127.0.0.1:{_port_nobody_listens_on()}" for _ in range(2))
    c = shoal.AsyncClient(head)
    handle = c.handle("echo", scheduler=scheduler)

    async def learn() -> None:
        handle._addresses = [scheduler]

    monkeypatch.setattr(handle, "_learn", learn)
    for _ in range(2):
        with pytest.raises(HeadUnreachable):
            asyncio.run(c.status())
        with pytest.raises(Unavailable, match="failed to connect"):
            asyncio.run(handle.infer({"x": [1.0]}))
    asyncio.run(c.close())


def test_every_error_crosses_processes_as_it_was() -> None:
    """Errors cross processes in users' code (multiprocessing and concurrent.futures pickle
    them). Before, a BodyTooLarge came back as 'request body is over the limit of request
    body of 20 bytes is over the limit of 10 bytes ... bytes': its ``__init__`` took the
    message for the limit."""
    import pickle

    errors: list[errors_module.ShoalError] = [
        cls("boom")
        for cls in vars(errors_module).values()
        if isinstance(cls, type)
        and issubclass(cls, errors_module.ShoalError)
        and cls is not errors_module.BodyTooLarge
    ]
    errors.append(errors_module.BodyTooLarge(10, 20))
    flagged = errors_module.Unavailable("gone")
    flagged.retry_elsewhere = False
    for err in [*errors, flagged]:
        back = pickle.loads(pickle.dumps(err))
        assert (type(back), str(back), back.message, back.http_status) == (
            type(err),
            str(err),
            err.message,
            err.http_status,
        )
        assert back.retry_elsewhere == err.retry_elsewhere


class _StatusOf:
    """A head that answers a status call with the names it was asked for."""

    asked: ClassVar[list[object]] = []

    def __init__(self, address: str, settings: object) -> None:
        pass

    async def status(self, only: object = None) -> object:
        self.asked.append(only)
        return object()

    async def close(self) -> None:
        pass


async def test_status_of_one_name_given_as_a_string_is_of_that_deployment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, ``status("echo")`` asked for the deployments 'e', 'c', 'h' and 'o' (a str is a
    collection of str), and answered, quietly, about none."""
    import shoal.rpc.clients

    monkeypatch.setattr(shoal.rpc.clients, "ControlClient", _StatusOf)
    async with shoal.AsyncClient("127.0.0.1:1") as c:
        await c.status("echo")
        await c.status(["echo", "b"])
    assert _StatusOf.asked == [("echo",), ("echo", "b")]


class _GoneNative:
    """A scheduler that is gone: every call is Unavailable."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.calls = 0

    async def infer(self, name: str, arrays: dict[str, np.ndarray], **kw: object) -> object:
        self.calls += 1
        raise Unavailable(
            f"failed to connect to all addresses; last error: {self.address}: Connection refused"
        )


async def test_a_handle_tries_a_scheduler_that_failed_last_and_names_those_it_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, every call of a handle went first to the scheduler that had just failed (a
    dead one was dialled again at each call), and when none answered, the error was gRPC's
    'failed to connect to all addresses' for the last, naming neither the deployment nor
    the others tried."""
    gone, gone_too, live = _GoneNative("10.0.0.1:8001"), _GoneNative("10.0.0.2:8001"), _CountingNative()
    natives: dict[str, Any] = {"10.0.0.1:8001": gone, "10.0.0.2:8001": gone_too, "10.0.0.3:8001": live}
    async with shoal.AsyncClient("127.0.0.1:1") as c:
        handle = c.handle("echo")
        addresses = list(natives)

        async def learn() -> None:
            handle._addresses = list(addresses)

        monkeypatch.setattr(handle, "_learn", learn)
        monkeypatch.setattr(c, "_native_client", natives.__getitem__)
        for _ in range(3):
            await handle.infer({"x": [1.0]})
        assert (gone.calls, gone_too.calls, len(live.sent)) == (1, 1, 3)
        addresses = ["10.0.0.1:8001", "10.0.0.2:8001"]  # the live one is gone too
        handle._addresses = list(addresses)
        with pytest.raises(Unavailable) as err:
            await handle.infer({"x": [1.0]})
    assert str(err.value) == (
        "no scheduler took the request to 'echo': tried 10.0.0.1:8001, 10.0.0.2:8001; the last "
        "said: failed to connect to all addresses; last error: 10.0.0.2:8001: Connection refused"
    )


def test_clients_and_handles_pickle_as_what_they_connect_to() -> None:
    """The fork refusal says to start workers with 'spawn', which pickles what it passes them.
    Before, a Client or Handle raised "cannot pickle '_thread.lock' object", and an
    AsyncClient that had made a call "Can't pickle local object 'WeakSet...'". Each now
    pickles as its settings (and a handle's name): unpickled, it connects anew."""
    import pickle

    address = f"127.0.0.1:{_port_nobody_listens_on()}"
    with shoal.connect(address, token="t0k3n") as c:
        handle = c.handle("echo", scheduler="127.0.0.1:9")
        with pytest.raises(HeadUnreachable):
            c.status()
        for thing in (c, handle, c.aio, handle._inner):
            back = pickle.loads(pickle.dumps(thing))
            assert type(back) is type(thing)
        client, handle_back = pickle.loads(pickle.dumps((c, handle)))
    with client:
        assert (client.aio.address, client.aio.settings.token) == (address, "t0k3n")
        assert (handle_back.name, handle_back._inner.scheduler) == ("echo", "127.0.0.1:9")
        with pytest.raises(HeadUnreachable, match=f"cannot reach the head at {address}"):
            client.status()


async def test_a_handle_that_names_its_scheduler_infers_while_the_head_is_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inference does not go through the head. Before, a new handle naming its scheduler
    raised HeadUnreachable while the head was down (restarting, or failing over), though
    the scheduler served; now it goes to it, its inputs typed by their values. Without a
    scheduler named, the head is the only one that knows them: HeadUnreachable."""
    native = _CountingNative()
    async with shoal.AsyncClient(f"127.0.0.1:{_port_nobody_listens_on()}") as c:
        monkeypatch.setattr(c, "_native_client", lambda address: native)
        outputs = await c.handle("echo", scheduler="127.0.0.1:9").infer({"x": [[1, 2]]})
        assert outputs["x"].dtype == np.float32 and len(native.sent) == 1
        with pytest.raises(HeadUnreachable):
            await c.handle("echo").infer({"x": [[1, 2]]})


class _NeverAnswers:
    """A head whose status call never ends (as a deploy's wait between its polls)."""

    started: ClassVar[threading.Semaphore] = threading.Semaphore(0)

    def __init__(self, address: str, settings: object) -> None:
        pass

    async def status(self, only: object = None) -> object:
        self.started.release()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        pass


def test_close_ends_the_calls_other_threads_are_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, ``close()`` while other threads were in calls left some of those threads
    waiting for good (a thread pool of 4 calling a handle in a loop: 1 to 4 stuck in 2 runs
    of 3, the others ended in a bare CancelledError). Each call now ends, with a
    FailedPrecondition that says the client was closed."""
    import shoal.rpc.clients

    monkeypatch.setattr(shoal.rpc.clients, "ControlClient", _NeverAnswers)
    c = shoal.connect("127.0.0.1:1")
    ended: list[BaseException] = []

    def call() -> None:
        try:
            c.status()
        except BaseException as err:
            ended.append(err)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in threads:
        assert _NeverAnswers.started.acquire(timeout=10)
    c.close()
    for t in threads:
        t.join(timeout=10)
    assert [str(err) for err in ended] == ["the client was closed during this call"] * 3
    assert all(isinstance(err, FailedPrecondition) for err in ended)
    # Before, a call after close() started the loop again: with calls of other threads
    # racing the close, some then waited for good on a channel of the loop that was closed.
    with pytest.raises(FailedPrecondition, match=r"^the client is closed: make another"):
        c.status()
    c.close()  # again: nothing to do


class _SlowHead:
    """A head whose status calls each take ``delay_s``, counted; the first ``failures`` of
    them fail (ResourceExhausted: an Unavailable would make the client ask the head again,
    to tell a head that is down from one that answers)."""

    calls: ClassVar[int] = 0
    failures: ClassVar[int] = 0
    delay_s: ClassVar[float] = 0.2

    def __init__(self, address: str, settings: object) -> None:
        pass

    async def status(self, only: object = None) -> object:
        from shoal.core.status import ClusterStatus, DeploymentStatus

        type(self).calls += 1
        await asyncio.sleep(self.delay_s)
        if type(self).calls <= self.failures:
            raise ResourceExhausted(f"status call {type(self).calls} failed")
        return ClusterStatus(deployments=(DeploymentStatus("echo", 1),))

    async def close(self) -> None:
        pass


def _slow_head(monkeypatch: pytest.MonkeyPatch, failures: int = 0) -> None:
    import shoal.rpc.clients

    monkeypatch.setattr(shoal.rpc.clients, "ControlClient", _SlowHead)
    monkeypatch.setattr(_SlowHead, "calls", 0)
    monkeypatch.setattr(_SlowHead, "failures", failures)


def test_threads_calling_a_fresh_handle_at_once_send_one_status_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, each of N threads calling a fresh handle at once sent its own status call to
    the head (64 threads: 31 calls against a real cluster, 64 from coroutines). The first
    look-up is shared: one call, and every thread's request is sent."""
    _slow_head(monkeypatch)
    native = _CountingNative()
    with shoal.connect("127.0.0.1:1") as c:
        monkeypatch.setattr(c.aio, "_native_client", lambda address: native)
        handle = c.handle("echo", scheduler="127.0.0.1:9")
        barrier = threading.Barrier(16)
        done: list[object] = []

        def call() -> None:
            barrier.wait()
            done.append(handle.infer({"x": [[1.0]]}))

        threads = [threading.Thread(target=call, daemon=True) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    assert (_SlowHead.calls, len(done), len(native.sent)) == (1, 16, 16)


async def test_calls_waiting_on_a_look_up_that_fails_all_fail_with_its_error_and_the_next_asks_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _slow_head(monkeypatch, failures=1)
    native = _CountingNative()
    async with shoal.AsyncClient("127.0.0.1:1") as c:
        monkeypatch.setattr(c, "_native_client", lambda address: native)
        handle = c.handle("echo", scheduler="127.0.0.1:9")
        ended = await asyncio.gather(
            *(handle.infer({"x": [[1.0]]}) for _ in range(8)), return_exceptions=True
        )
        assert [str(err) for err in ended] == ["status call 1 failed"] * 8
        assert all(isinstance(err, ResourceExhausted) for err in ended)
        assert (_SlowHead.calls, native.sent) == (1, [])
        # The failure is not kept: the next call looks up again, and is sent.
        await handle.infer({"x": [[1.0]]})
        assert (_SlowHead.calls, len(native.sent)) == (2, 1)


async def test_a_caller_cancelled_during_the_shared_look_up_leaves_it_to_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The caller that started the look-up may go (Ctrl-C in its thread, a timeout): the
    others still get its answer, and no second status call is sent."""
    _slow_head(monkeypatch)
    native = _CountingNative()
    async with shoal.AsyncClient("127.0.0.1:1") as c:
        monkeypatch.setattr(c, "_native_client", lambda address: native)
        handle = c.handle("echo", scheduler="127.0.0.1:9")
        first = asyncio.create_task(handle.infer({"x": [[1.0]]}))
        await asyncio.sleep(0.01)  # its look-up is in flight
        others = [asyncio.create_task(handle.infer({"x": [[2.0]]})) for _ in range(3)]
        await asyncio.sleep(0.01)
        first.cancel()
        outputs = await asyncio.gather(*others)
        with pytest.raises(asyncio.CancelledError):
            await first
    assert [o["x"].tolist() for o in outputs] == [[[2.0]]] * 3
    assert (_SlowHead.calls, len(native.sent)) == (1, 3)


def test_close_ends_the_threads_waiting_on_a_handle_s_look_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads waiting on a shared look-up that never ends are not left waiting: ``close()``
    ends them all, as it ends any call in progress."""
    import shoal.rpc.clients

    monkeypatch.setattr(shoal.rpc.clients, "ControlClient", _NeverAnswers)
    monkeypatch.setattr(_NeverAnswers, "started", threading.Semaphore(0))
    c = shoal.connect("127.0.0.1:1")
    handle = c.handle("echo")
    ended: list[BaseException] = []

    def call() -> None:
        try:
            handle.infer({"x": [[1.0]]})
        except BaseException as err:
            ended.append(err)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    assert _NeverAnswers.started.acquire(timeout=10)
    time.sleep(0.2)  # the others join the look-up
    c.close()
    for t in threads:
        t.join(timeout=10)
    assert [str(err) for err in ended] == ["the client was closed during this call"] * 4
    assert not _NeverAnswers.started.acquire(timeout=0)  # one status call, not four
