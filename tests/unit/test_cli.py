"""The CLI's decisions over plain data: arguments, when a deploy is done or failed, merged logs,
pid files, and the head's /docs page (in-process ASGI, no socket)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psutil
import pytest

from shoal import __version__
from shoal.cli import build_parser, deploy, main
from shoal.cli.common import ProgressLine, run_command, with_client
from shoal.cli.deploy import traceback_excerpt, wait_for
from shoal.cli.logs import Shown, escaped, merge_logs
from shoal.cli.processes import pid_file, running
from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import FAILED, FAILED_AFTER, READY, REPLICA_DEAD, ReplicaReport
from shoal.core.deploy_watch import FAIL_AFTER, DeployWatch
from shoal.core.placement import Capacity
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.errors import DeadlineExceeded, InvalidArgument, ShoalError, Unavailable
from shoal.head.node import ApplyResult, HeadNode, cluster_status
from shoal.http.head import head_app
from shoal.store import MemoryStore
from shoal.store.history import Revision
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration

pytestmark = pytest.mark.timeout(10)


def spec(name: str = "echo", *, cpus: float = 0.5, model: str = "m:M", replicas: int = 1) -> DeploymentSpec:
    return parse_spec(
        {"name": name, "backend": "python", "model": model, "replicas": replicas, "resources": {"cpus": cpus}}
    )


# ------------------------------------------------------------------ arguments


def test_head_is_accepted_before_and_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["scheduler", "--head", "h:1"]).head == "h:1"
    assert parser.parse_args(["--head", "h:2", "scheduler"]).head == "h:2"
    assert parser.parse_args(["--head", "h:2", "status"]).head == "h:2"
    assert parser.parse_args(["status", "--head", "h:3"]).head == "h:3"


def test_a_head_setting_is_a_flag_of_the_commands_that_run_a_head_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--max-blob-mb`` bounds what the head takes (docs/operations.md: on ``shoal head`` and
    ``shoal up``). ``shoal scheduler --max-blob-mb 1`` used to be taken, and bounded nothing."""
    parser = build_parser()
    assert parser.parse_args(["head", "--max-blob-mb", "1"]).max_blob_mb == 1
    assert parser.parse_args(["up", "--max-blob-mb", "1"]).max_blob_mb == 1
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["scheduler", "--max-blob-mb", "1"])
    assert exit.value.code == 2
    assert "unrecognized arguments: --max-blob-mb" in capsys.readouterr().err


def test_every_argument_of_every_command_says_what_it_is() -> None:
    """``shoal COMMAND --help`` is where a user looks first: 'shoal status --help' showed a bare
    ``--json``, 'shoal scale --help' a bare ``name replicas``, 'shoal token create --help' a
    bare ``--role``, 18 arguments in all."""

    def bare(parser: argparse.ArgumentParser, path: str) -> Iterator[str]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from bare(sub, f"{path} {name}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                yield f"{path} {'/'.join(action.option_strings) or action.dest}"

    assert list(bare(build_parser(), "shoal")) == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"shoal {__version__}"


# ------------------------------------------------------------------ deploy: done or failed


@pytest.fixture
async def head() -> AsyncIterator[HeadNode]:
    node = HeadNode(Settings(), MemoryStore(), FakeSchedulers(), FakeClock())
    await node.register_scheduler(
        SchedulerRegistration("s1", "s1:7000", "s1:7001", Capacity(1, 8192, 0), pid=1, hostname="h")
    )
    yield node
    await node.aclose()


async def past_backoff(head: HeadNode) -> None:
    """Time enough for the next start (backoff 1, 2, then 4 s), the scheduler still beating."""
    assert isinstance(head.clock, FakeClock)
    head.clock.advance(4.5)
    assert await head.scheduler_health("s1", 1_000_000, [])


async def test_no_room_is_an_answer_once_it_has_held_a_reconcile_pass(head: HeadNode) -> None:
    before = cluster_status(head)
    three = spec(cpus=0.5, replicas=3)  # s1 has 1 cpu: room for two
    await head.apply(three)
    watch = DeployWatch.after_apply(before, [three])
    await head.reconcile_once()
    first = watch.observe(cluster_status(head), now=0.0)
    assert not first.done and not first.failure  # may be the reason from before the apply
    later = watch.observe(cluster_status(head), now=1.0)
    assert (
        "deployment echo cannot be placed: no scheduler has room (cpus 0.5 > 0 free on s1)" in later.failure
    )
    assert "when room appears (free some, or add a scheduler)" in later.failure
    assert "shoal delete echo" in later.failure


async def test_a_replica_bigger_than_any_scheduler_is_an_answer_that_freeing_room_cannot_help(
    head: HeadNode,
) -> None:
    before = cluster_status(head)
    big = spec(cpus=2)  # s1 has 1 cpu in all
    await head.apply(big)
    watch = DeployWatch.after_apply(before, [big])
    await head.reconcile_once()
    assert not watch.observe(cluster_status(head), now=0.0).failure
    later = watch.observe(cluster_status(head), now=1.0)
    assert (
        "deployment echo cannot be placed: no scheduler is big enough (cpus 2 > 1, the largest capacity). "
        "Freeing room cannot help: lower its resources in the spec" in later.failure
    )
    assert "free some" not in later.failure
    assert "shoal delete echo" in later.failure


async def test_no_live_scheduler_is_an_answer_too() -> None:
    node = HeadNode(Settings(), MemoryStore(), FakeSchedulers(), FakeClock())
    try:
        await node.apply(spec())
        watch = DeployWatch.after_apply({"deployments": []}, [spec()])
        await node.reconcile_once()
        watch.observe(cluster_status(node), now=0.0)
        assert "no live scheduler" in watch.observe(cluster_status(node), now=1.0).failure
    finally:
        await node.aclose()


async def test_replicas_that_fail_to_start_fail_the_deploy(head: HeadNode) -> None:
    before = cluster_status(head)
    s = spec()
    await head.apply(s)
    watch = DeployWatch.after_apply(before, [s])
    seen: list[str] = []
    for i in range(FAIL_AFTER):
        actions = await head.reconcile_once()
        (create,) = actions
        seen.append(create.replica_id)
        assert not watch.observe(cluster_status(head), now=float(i)).failure
        dead = ReplicaReport(
            create.replica_id, "echo", REPLICA_DEAD, message="process exited with code 1: ValueError: boom"
        )
        await head.scheduler_health("s1", 1_000_000, [dead])
        await head.reconcile_once()
        verdict = watch.observe(cluster_status(head), now=float(i) + 0.5)
        await past_backoff(head)
    assert verdict.failure == (
        f"deployment echo failed: its replicas fail to start ({FAIL_AFTER} times in a row): "
        "process exited with code 1: ValueError: boom"
    )
    assert verdict.dead == tuple(reversed(seen))  # the most recent first: its log says why


async def test_min_ready_fails_a_deploy_whose_replicas_crash_soon_after_ready(head: HeadNode) -> None:
    # A model that dies a second after loading: READY at one look, so a plain deploy passed it
    # (and the head restarted it for ever). With --min-ready the deploy waits to see it stay.
    assert isinstance(head.clock, FakeClock)
    before = cluster_status(head)
    s = spec()
    await head.apply(s)
    plain = DeployWatch.after_apply(before, [s])
    watch = DeployWatch.after_apply(before, [s], min_ready_s=5.0)
    verdicts = []
    for i in range(FAIL_AFTER):
        (create,) = await head.reconcile_once()
        ready = ReplicaReport(create.replica_id, "echo", READY, address="r:1", ready_at=1.0)
        await head.scheduler_health("s1", 1_000_000, [ready])
        assert plain.observe(cluster_status(head), now=float(i)).done
        held = watch.observe(cluster_status(head), now=float(i))
        assert not held.done and not held.failure
        assert "echo 1/1 ready, to stay READY 5s more" in held.line
        head.clock.advance(1.0)
        dead = ReplicaReport(
            create.replica_id,
            "echo",
            REPLICA_DEAD,
            message="process exited with code 1: RuntimeError: lost the device",
            ready_at=1.0,
            crashed=True,
        )
        await head.scheduler_health("s1", 1_000_000, [dead])
        await head.reconcile_once()
        verdicts.append(watch.observe(cluster_status(head), now=float(i) + 0.5))
        await past_backoff(head)
    assert not verdicts[0].failure  # one may be chance
    assert verdicts[-1].failure == (
        f"deployment echo failed: its replicas fail to start ({FAIL_AFTER} times in a row): "
        "died 1s after READY: process exited with code 1: RuntimeError: lost the device"
    )


async def test_min_ready_is_done_once_the_replicas_have_stayed_ready(head: HeadNode) -> None:
    before = cluster_status(head)
    s = spec()
    await head.apply(s)
    watch = DeployWatch.after_apply(before, [s], min_ready_s=5.0)
    (create,) = await head.reconcile_once()
    ready = ReplicaReport(create.replica_id, "echo", READY, address="r:1", ready_at=1.0)
    await head.scheduler_health("s1", 1_000_000, [ready])
    assert not watch.observe(cluster_status(head), now=10.0).done
    assert not watch.observe(cluster_status(head), now=14.9).done
    assert watch.observe(cluster_status(head), now=15.0).done


async def test_a_replica_that_died_between_two_looks_is_still_named(head: HeadNode) -> None:
    """A replica that fails to load in milliseconds (forked, it imports nothing) can come
    and go between two looks at the status: its death, in the status's events, still names
    it for the deploy to show its log; a death from before the apply does not."""
    s = spec()
    await head.apply(s)
    (earlier,) = await head.reconcile_once()
    await head.scheduler_health(
        "s1", 1_000_000, [ReplicaReport(earlier.replica_id, "echo", REPLICA_DEAD, message="old")]
    )
    await past_backoff(head)
    watch = DeployWatch.after_apply(cluster_status(head), [s])
    (create,) = await head.reconcile_once()
    dead = ReplicaReport(
        create.replica_id, "echo", REPLICA_DEAD, message="process exited with code 1: ValueError: boom"
    )
    await head.scheduler_health("s1", 1_000_000, [dead])  # never seen in a status: gone already
    verdict = watch.observe(cluster_status(head), now=0.0)
    assert verdict.dead == (create.replica_id,)


async def test_failures_from_before_the_apply_are_not_taken_for_new_ones(head: HeadNode) -> None:
    broken = spec(model="broken:M")
    await head.apply(broken)
    for _ in range(FAIL_AFTER):
        actions = await head.reconcile_once()
        dead = ReplicaReport(actions[0].replica_id, "echo", REPLICA_DEAD, message="old error")
        await head.scheduler_health("s1", 1_000_000, [dead])
        await head.reconcile_once()
        await past_backoff(head)
    # Start again, fail again: backing off now, the head's reason names the failures before.
    dead = ReplicaReport(
        (await head.reconcile_once())[0].replica_id, "echo", REPLICA_DEAD, message="old error"
    )
    await head.scheduler_health("s1", 1_000_000, [dead])
    await head.reconcile_once()
    before = cluster_status(head)
    assert before["deployments"][0]["pending_reason"].startswith(f"{FAIL_AFTER + 1} replica start failure(s)")
    fixed = spec(model="fixed:M")
    await head.apply(fixed)
    watch = DeployWatch.after_apply(before, [fixed])
    assert not watch.observe(cluster_status(head), now=0.0).failure


async def test_a_failed_deployment_is_an_answer(head: HeadNode) -> None:
    s = spec()
    await head.apply(s)
    for _ in range(FAILED_AFTER):
        (create,) = await head.reconcile_once()
        dead = ReplicaReport(create.replica_id, "echo", REPLICA_DEAD, message="ValueError: boom")
        await head.scheduler_health("s1", 1_000_000, [dead])
        await past_backoff(head)
    await head.reconcile_once()
    before = cluster_status(head)
    assert before["deployments"][0]["pending_reason"].startswith(FAILED)
    await head.apply(s)  # unchanged: nothing will start it again
    watch = DeployWatch.after_apply(before, [s])
    assert not watch.observe(cluster_status(head), now=0.0).failure
    failure = watch.observe(cluster_status(head), now=1.0).failure
    assert failure.startswith(f"deployment echo failed: {FAILED_AFTER} replicas in a row died before READY")


def status_of(
    s: DeploymentSpec, *replicas: tuple[str, str], reason: str = "", target: int = 1
) -> dict[str, Any]:
    return {
        "deployments": [
            {
                "name": s.name,
                "spec": s.model_dump(mode="json"),
                "target_replicas": target,
                "pending_reason": reason,
                "replicas": [{"id": rid, "state": state} for rid, state in replicas],
            }
        ]
    }


def test_a_rollout_is_done_when_the_new_replicas_serve_and_the_old_are_gone() -> None:
    old, new = spec(model="v1:M"), spec(model="v2:M")
    watch = DeployWatch.after_apply(status_of(old, ("echo-old", "READY")), [new])
    # Right after the apply, before the head acted: the old replica is READY, but it is old.
    v = watch.observe(status_of(new, ("echo-old", "READY")), now=0)
    assert not v.done and v.line == "echo 0/1 ready, 1 old"
    v = watch.observe(status_of(new, ("echo-old", "READY"), ("echo-new", "READY")), now=1)
    assert not v.done and v.line == "echo 1/1 ready, 1 old"
    assert watch.observe(status_of(new, ("echo-new", "READY")), now=2).done


def test_a_change_of_replica_count_only_keeps_its_replicas() -> None:
    watch = DeployWatch.after_apply(status_of(spec(), ("echo-a", "READY")), [spec(replicas=2)])
    assert not watch.observe(status_of(spec(), ("echo-a", "READY"), target=2), now=0).done
    assert watch.observe(status_of(spec(), ("echo-a", "READY"), ("echo-b", "READY"), target=2), now=1).done


def test_replicas_drained_to_a_lower_count_are_draining_not_starting() -> None:
    watch = DeployWatch.after_apply(
        status_of(spec(), ("echo-a", "READY"), ("echo-b", "READY"), ("echo-c", "READY"), target=3), [spec()]
    )
    v = watch.observe(
        status_of(spec(), ("echo-a", "READY"), ("echo-b", "DRAINING"), ("echo-c", "DRAINING")), now=0
    )
    assert not v.done and v.line == "echo 1/1 ready, 2 draining"
    assert watch.observe(status_of(spec(), ("echo-a", "READY")), now=1).done


def test_draining_to_make_room_is_progress_not_failure() -> None:
    old, new = spec(model="v1:M"), spec(model="v2:M")
    watch = DeployWatch.after_apply(status_of(old, ("echo-old", "READY")), [new])
    reason = "no scheduler has room (cpus 1 > 0 free on s1); draining one old replica first to make room"
    for now in (0.0, 5.0):
        assert not watch.observe(status_of(new, ("echo-old", "DRAINING"), reason=reason), now=now).failure


async def test_progress_is_one_line_per_change_not_per_countdown(capsys: pytest.CaptureFixture[str]) -> None:
    s = spec()
    statuses: Iterator[dict[str, Any]] = iter(
        [
            status_of(s, reason="waiting 5s for schedulers to register again after a head restart"),
            status_of(s, reason="waiting 4s for schedulers to register again after a head restart"),
            status_of(s, reason="waiting 3s for schedulers to register again after a head restart"),
            status_of(s, ("echo-a", "STARTING")),
            status_of(s, ("echo-a", "STARTING")),
            status_of(s, ("echo-a", "READY")),
        ]
    )

    async def read() -> dict[str, Any]:
        return next(statuses)

    code, verdict = await wait_for(
        read, DeployWatch.after_apply({}, [s]), 60, ProgressLine(tty=False), poll_s=0
    )
    assert code == 0 and verdict.done
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "echo 0/1 ready (waiting 5s for schedulers to register again after a head restart)",
        "echo 0/1 ready, 1 starting",
        "echo 1/1 ready",
        lines[-1],
    ]
    assert lines[-1].startswith("ready after ")


async def test_a_terminal_gets_one_line_redrawn(capsys: pytest.CaptureFixture[str]) -> None:
    s = spec()
    statuses = iter([status_of(s), status_of(s, ("echo-a", "STARTING")), status_of(s, ("echo-a", "READY"))])

    async def read() -> dict[str, Any]:
        return next(statuses)

    await wait_for(read, DeployWatch.after_apply({}, [s]), 60, ProgressLine(tty=True), poll_s=0)
    out = capsys.readouterr().out
    assert out.count("\n") == 2  # the redrawn line, ended once, then the summary
    assert out.count("\r") == 3


def test_what_the_cli_prints_of_the_cluster_cannot_write_to_the_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A replica's death reason is the last line of its log, which a model's crash writes raw,
    and errors quote a model's words: ``shoal deploy``'s progress and ``shoal: error:`` lines
    wrote their escape sequences to the terminal as they came."""
    ProgressLine(tty=True).show("echo 0/1 ready: process exited with code 1: \x1b]0;pwned\x07")
    out = capsys.readouterr().out
    assert "pwned\x07" not in out and "\\x1b]0;pwned\\x07" in out and out.endswith("\033[K")

    def fails(args: argparse.Namespace) -> int:
        raise ShoalError("model raised ValueError: \x1b[2J\nshoal: ok")

    with pytest.raises(SystemExit):
        run_command(argparse.Namespace(fn=fails))
    assert capsys.readouterr().err == "shoal: error: model raised ValueError: \\x1b[2J\\nshoal: ok\n"


async def test_timeout_names_what_is_pending(capsys: pytest.CaptureFixture[str]) -> None:
    s = spec()

    async def read() -> dict[str, Any]:
        return status_of(s, ("echo-a", "STARTING"))

    code, _ = await wait_for(read, DeployWatch.after_apply({}, [s]), 0, ProgressLine(tty=False), poll_s=0)
    assert code == 1
    assert "shoal: error: not ready after 0s: echo 0/1 ready, 1 starting" in capsys.readouterr().err


def test_traceback_excerpt_is_the_root_cause_of_the_last_traceback() -> None:
    model_error = [
        "Traceback (most recent call last):",
        '  File "m.py", line 3, in __init__',
        "ValueError: boom",
    ]
    wrapped = [
        "",
        "The above exception was the direct cause of the following exception:",
        "",
        "Traceback (most recent call last):",
        '  File "shoal/backends/python.py", line 80, in _load',
        "shoal.errors.InvalidArgument: Model(**options) raised ValueError: boom",
    ]
    earlier = ["Traceback (most recent call last):", '  File "m.py", line 9, in predict', "KeyError: x"]
    lines = [*earlier, "10:00:01 replica e-1 INFO shoal.replica: loading", *model_error, *wrapped]
    assert traceback_excerpt(lines) == model_error
    assert traceback_excerpt(model_error) == model_error
    assert traceback_excerpt(["a", "b"]) == ["a", "b"]
    deep = ["Traceback (most recent call last):", *[f"  frame {i}" for i in range(50)], "ValueError: deep"]
    assert traceback_excerpt(deep, most=5) == [
        deep[0],
        "  ...",
        "  frame 48",
        "  frame 49",
        "ValueError: deep",
    ]


# ------------------------------------------------------------------ logs


def test_deployment_logs_merge_by_time_and_keep_unstamped_lines_in_place() -> None:
    merged = merge_logs(
        {
            "e-2": "10:00:02 replica e-2 INFO loaded\n10:00:04 replica e-2 INFO serving\n",
            "e-1": "10:00:01 replica e-1 INFO loaded\nhello from the model\n"
            "10:00:03 replica e-1 INFO serving\n",
        }
    )
    assert merged == [
        "e-1 | 10:00:01 replica e-1 INFO loaded",
        "e-1 | hello from the model",
        "e-2 | 10:00:02 replica e-2 INFO loaded",
        "e-1 | 10:00:03 replica e-1 INFO serving",
        "e-2 | 10:00:04 replica e-2 INFO serving",
    ]
    json_lines = {"a": json.dumps({"ts": 5.0, "msg": "x"}), "b": json.dumps({"ts": 4.0, "msg": "y"})}
    assert [ln[0] for ln in merge_logs(json_lines)] == ["b", "a"]
    # A line ends at a newline only, as with --follow: before, a bare \r (a progress bar's)
    # ended one too, and its pieces were printed as lines of their own.
    assert merge_logs({"e-1": "10:00:01 a\rb\r\nc\x0cd\n\n"}) == [
        "e-1 | 10:00:01 a\rb\r",
        "e-1 | c\x0cd",
        "e-1 | ",
    ]


def test_control_characters_are_escaped_for_a_terminal_but_tab_and_newline() -> None:
    """A replica's log is what its model printed: on the operator's terminal it must not set
    the window title (OSC 0), clear the screen (CSI 2J), plant a hyperlink (OSC 8), hide a
    line behind a \r, or act through a C1 control (U+009B is CSI on its own). Escaped as
    shoal's own text log lines escape a message (``shoal.logs.escaped``), newlines kept."""
    assert escaped("title\x1b]0;pwned\x07\x1b[2J") == "title\\x1b]0;pwned\\x07\\x1b[2J"
    assert escaped("\x1b]8;;http://evil\x07x\x1b]8;;\x07") == "\\x1b]8;;http://evil\\x07x\\x1b]8;;\\x07"
    assert escaped("rm -rf /\rall is well") == "rm -rf /\\rall is well"
    assert escaped("\x00\x7f\x85\x9b\x9f\u2028") == "\\x00\\x7f\\x85\\x9b\\x9f\\u2028"
    kept = "tab\tnewline\n é € 日本 🙂 \xa0 \\x1b as written"  # text, and a backslash, pass as they are
    assert escaped(kept) == kept


def test_bytes_that_are_not_utf8_are_shown_as_hex_and_a_character_cut_between_chunks_whole() -> None:
    show = Shown()
    euro = "€".encode()
    assert show(b"a\xff\xfe b " + euro[:2]) == b"a\\xff\\xfe b "  # the cut euro waits for its end
    assert show(euro[2:] + b" \x1b[31mred\n") == "€ \\x1b[31mred\n".encode()
    assert show(b"cut at the end \xe2\x82") == b"cut at the end "
    assert show(b"", True) == b"\\xe2\\x82"  # the stream ended: what was kept, as bytes
    for data in (bytes(range(256)), b"\xc0\x80\xed\xa0\x80\xf4\x90\x80\x80"):  # never raises
        text = Shown()(data, True).decode()  # valid UTF-8, whatever came
        assert not [c for c in text if (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F) and c not in "\t\n"]


# ------------------------------------------------------------------ pid files


def test_a_pid_file_names_a_live_process_only_with_its_start_time(tmp_path: Path) -> None:
    me = psutil.Process()
    path = pid_file(tmp_path, "up")
    path.write_text(json.dumps({"pid": me.pid, "started": me.create_time()}))
    found = running(path)
    assert found is not None and found.pid == me.pid
    path.write_text(json.dumps({"pid": me.pid, "started": me.create_time() - 3600}))  # a reused pid
    assert running(path) is None
    path.write_text("not json")
    assert running(path) is None


def test_down_with_nothing_running_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pid_file(tmp_path, "up").write_text(json.dumps({"pid": 1, "started": 0}))  # stale
    with pytest.raises(SystemExit) as exit:
        main(["down", "--state", str(tmp_path)])
    assert exit.value.code == 0
    assert "nothing to stop" in capsys.readouterr().out
    assert not pid_file(tmp_path, "up").exists()


@pytest.mark.parametrize("where", ["after", "before"])
def test_down_with_another_heads_address_is_refused_naming_the_state_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """down works by state folder: given the address of a head that is not this folder's,
    stopping this machine's cluster would stop the wrong one. Before: after the command a
    usage error (unrecognized arguments: --head), before it silently ignored."""
    (tmp_path / "endpoints.json").write_text(json.dumps({"head": "127.0.0.1:9470"}))
    head = ["--head", "10.0.0.7:8470"]
    argv = [*head, "down", "--state", str(tmp_path)] if where == "before" else ["down", *head]
    argv += [] if where == "before" else ["--state", str(tmp_path)]
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert (
        f"({tmp_path.resolve()}, whose head is at 127.0.0.1:9470), not the head at --head 10.0.0.7:8470"
        in err
    )


def test_down_with_its_own_heads_address_stops_as_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "endpoints.json").write_text(json.dumps({"head": "127.0.0.1:9470"}))
    with pytest.raises(SystemExit) as exit:
        main(["down", "--head", "localhost:9470", "--state", str(tmp_path)])
    assert exit.value.code == 0
    assert "nothing to stop" in capsys.readouterr().out


# ------------------------------------------------------------------ deploy, as the user sees it


class ScriptedHead:
    """The head as ``shoal deploy`` and ``shoal rollback`` see it: its statuses in turn (the last
    one again and again), and the revisions ``history`` answers."""

    def __init__(self, statuses: list[dict[str, Any]], revisions: list[Revision] | None = None) -> None:
        self.statuses = statuses
        self.revisions = revisions or []
        self.asked: list[Collection[str] | None] = []  # each status read's ``only``

    async def apply(self, spec: DeploymentSpec, if_revision: int | None = None) -> ApplyResult:
        return ApplyResult(created=False, changed=True, revision=2, change="model changed")

    async def rollback(self, name: str, revision: int = 0) -> Revision:
        return Revision(3, 0.0, "rolled_back", spec(model="v1:M").to_json(), "", "asked for", rollback_to=1)

    async def status(self, only: Collection[str] | None = None) -> Any:
        self.asked.append(only)
        doc = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return SimpleNamespace(to_json=lambda: doc)

    async def history(self, name: str) -> list[Revision]:
        return self.revisions

    async def read_log(self, replica_id: str, tail_bytes: int, follow: bool) -> AsyncIterator[bytes]:
        return
        yield b""

    async def close(self) -> None:
        pass


def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], head: ScriptedHead, *argv: str
) -> tuple[int, str, str]:
    """``shoal ARGV`` against ``head``: its exit status, stdout and stderr."""
    import shoal.rpc.clients

    monkeypatch.setattr(shoal.rpc.clients, "ControlClient", lambda a, s: head)
    with pytest.raises(SystemExit) as exit:
        main(["--head", "127.0.0.1:1", *argv])
    out = capsys.readouterr()
    return int(exit.value.code or 0), out.out, out.err


@pytest.fixture
def v2_file(tmp_path: Path) -> str:
    path = tmp_path / "v2.yaml"
    path.write_text("name: echo\nbackend: python\nmodel: 'v2:M'\nresources: {cpus: 0.5}\n")
    return str(path)


def test_a_deploy_whose_deployment_is_deleted_meanwhile_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], v2_file: str
) -> None:
    monkeypatch.setattr(deploy, "ROLLBACK_WAIT_S", 0.5)
    head = ScriptedHead([status_of(spec(model="v1:M"), ("echo-old", "READY")), {"deployments": []}])
    code, out, err = run_cli(monkeypatch, capsys, head, "deploy", "--no-upload", v2_file)
    assert code == 1 and "ready after" not in out
    assert err.splitlines() == ["shoal: error: deployment echo was deleted while it was being deployed"]
    # It read the status of its deployment alone, before and while it waited: the whole
    # cluster's, four times a second, held a head of 10,000 replicas 0.14-0.27 s each time.
    assert len(head.asked) >= 2 and set(head.asked) == {("echo",)}


def revisions_after(third: Revision) -> list[Revision]:
    """Revision 1, revision 2 (the deploy's, ScriptedHead.apply), then ``third``."""
    return [
        Revision(1, 0.0, "created", "{}", "aaa", "created"),
        Revision(2, 0.0, "updated", "{}", "bbb", "model changed"),
        third,
    ]


def test_a_deploy_superseded_by_another_fails_at_once_without_rollback_advice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], v2_file: str
) -> None:
    monkeypatch.setattr(deploy, "ROLLBACK_WAIT_S", 0.5)
    v1, v3 = spec(model="v1:M"), spec(model="v3:M")
    head = ScriptedHead(
        [status_of(v1, ("echo-old", "READY")), status_of(v3, ("echo-old", "READY"))],
        revisions_after(Revision(3, 0.0, "updated", "{}", "ccc", "model changed")),
    )
    code, _, err = run_cli(monkeypatch, capsys, head, "deploy", "--no-upload", v2_file)
    assert code == 1
    assert err.splitlines() == [
        "shoal: error: deployment echo now runs another spec than the one deployed "
        "(rolled back, or deployed again meanwhile)",
        "deployment echo was changed again after this deploy's revision 2: "
        "revision 3 (updated: model changed) is the one rolling out now",
    ]


def test_a_deploy_rolled_back_by_the_head_says_to_which_revision(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], v2_file: str
) -> None:
    v1 = spec(model="v1:M")
    rolled_back = Revision(
        3, 0.0, "rolled_back", "{}", "aaa", "rolled back to revision 1 (revision 2 failed)", rollback_to=1
    )
    head = ScriptedHead(
        [status_of(v1, ("echo-old", "READY")), status_of(v1, ("echo-old", "READY"))],
        revisions_after(rolled_back),
    )
    code, _, err = run_cli(monkeypatch, capsys, head, "deploy", "--no-upload", v2_file)
    assert code == 1
    assert err.splitlines()[-1] == (
        "deployment echo rolled back to revision 1 (as revision 3): its previous replicas keep serving"
    )


class SlowApplyHead(ScriptedHead):
    """Applies that take a while (as each waits for the schedulers to be sent the table);
    ``bad`` is refused."""

    def __init__(self, bad: str) -> None:
        super().__init__([{"deployments": []}])
        self.bad = bad
        self.in_flight = 0
        self.most = 0

    async def apply(self, spec: DeploymentSpec, if_revision: int | None = None) -> ApplyResult:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.05)
            if spec.name == self.bad:
                raise InvalidArgument(f"deployment {spec.name!r}: auth.tokens names unknown token(s) 'x'")
            return ApplyResult(created=True, changed=True, revision=1, change="created")
        finally:
            self.in_flight -= 1


def test_deploy_applies_several_specs_at_once_says_each_in_order_and_fails_on_a_refused_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Each apply answers once the schedulers were sent its table (a wave, up to 0.5 s at
    # 1,000 schedulers): one after another, a repository of 100 models took 100 waves.
    path = tmp_path / "many.yaml"
    path.write_text(
        "\n---\n".join(
            f"name: m{i}\nbackend: python\nmodel: 'm:M'\nresources: {{cpus: 0.1}}" for i in range(6)
        )
    )
    head = SlowApplyHead(bad="m3")
    code, out, err = run_cli(monkeypatch, capsys, head, "deploy", "--no-upload", "--no-wait", str(path))
    assert head.most > 1
    assert out.splitlines() == [f"deployment m{i} created (revision 1)" for i in (0, 1, 2, 4, 5)]
    assert code == 1 and "'m3': auth.tokens names unknown token(s)" in err


def test_a_rollback_whose_deployment_is_deleted_meanwhile_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    head = ScriptedHead([status_of(spec(model="v2:M"), ("echo-new", "READY")), {"deployments": []}])
    code, out, err = run_cli(monkeypatch, capsys, head, "rollback", "echo")
    assert code == 1 and "ready after" not in out
    assert "deployment echo was deleted while it was being deployed" in err
    assert len(head.asked) >= 2 and set(head.asked) == {("echo",)}


# ------------------------------------------------------------------ /docs


async def test_the_head_serves_offline_api_docs_linked_from_the_dashboard(head: HeadNode) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=head_app(head)), base_url="http://h") as c:
        docs = await c.get("/docs")
        assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
        script = await c.get("/static/docs.js")  # a file of its own: no inline script runs
        assert '<script src="/static/docs.js">' in docs.text and 'fetch("/openapi.json")' in script.text
        # Nothing from the internet: no script, style or font from another origin.
        for text in (docs.text, script.text):
            assert "http://" not in text and "https://" not in text
        assert (await c.get("/api", follow_redirects=False)).headers["location"] == "/docs"
        assert 'href="/docs"' in (await c.get("/")).text


# ------------------------------------------------------------------ what failed


class FakeControl:
    def __init__(self, address: str, settings: Settings, *, head_up: bool = True) -> None:
        self.head_up = head_up

    async def status(self) -> object:
        if not self.head_up:
            raise Unavailable("connection refused")
        return object()

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("head_up", [True, False])
@pytest.mark.parametrize(
    ("error", "blamed"),
    [
        (Unavailable("the replica serving the request died"), "cannot reach the head at h:1"),
        (DeadlineExceeded("request r1 timed out after 1s"), "the head at h:1 did not answer in time"),
    ],
)
def test_unavailable_or_a_deadline_is_blamed_on_the_head_only_when_it_does_not_answer(
    monkeypatch: pytest.MonkeyPatch, head_up: bool, error: ShoalError, blamed: str
) -> None:
    import shoal.rpc.clients

    monkeypatch.setattr(shoal.rpc.clients, "ControlClient", lambda a, s: FakeControl(a, s, head_up=head_up))

    async def predict(client: Any, settings: Settings) -> int:
        raise error

    args = build_parser().parse_args(["--head", "h:1", "status"])
    with pytest.raises(type(error)) as err:
        with_client(args, predict)
    if head_up:
        assert str(err.value) == str(error)
    else:
        assert str(err.value).startswith(blamed)
