"""What every command shares: settings from flags, the control client, one progress line,
and :func:`run_command`, the one way an entry point runs a parsed command and exits."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

from shoal.config import Settings
from shoal.errors import (
    DeadlineExceeded,
    HeadSilent,
    HeadUnreachable,
    InvalidArgument,
    ShoalError,
    Unavailable,
)
from shoal.logs import escaped

EXIT_ERROR = 1
EXIT_USAGE = 2
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
CLI_POINT_AT_HEAD = "point --head / SHOAL_HEAD at it"
CLI_GIVE_TLS_DIR = "--tls-dir (SHOAL_TLS_DIR)"
"""How ``shoal.api.head_unreachable``'s message tells a command's user to give the head's
address and the cluster's certificate folder."""


def run_command(args: argparse.Namespace) -> NoReturn:
    """Run the command the parser chose (``args.fn(args)``, its result the exit code) and exit.

    For ``shoal`` and for the tools that also run alone (``python -m shoal.loadgen``,
    ``python -m shoal.chaos``): a ``ShoalError`` is one line on stderr and exit 1, Ctrl-C
    exit 130, a reader that went away (``shoal status | head``) exit 141, as a process
    killed by SIGPIPE; never a traceback.
    """
    try:
        code = args.fn(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
    except ShoalError as err:
        print(f"shoal: error: {escaped(str(err))}", file=sys.stderr)  # it may quote a model
        code = EXIT_ERROR
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # Nothing more can be written; what is still buffered must not fail again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    sys.exit(code)


def run_alone(
    prog: str,
    doc: str,
    add_options: Callable[[argparse.ArgumentParser], None],
    fn: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
    *,
    epilog: bool = False,
) -> NoReturn:
    """``main`` of a command that also runs alone (``python -m shoal.loadgen``): a parser of
    its own with ``--head`` and the command's options, the first line of ``doc`` as its
    description (with ``epilog``, ``doc`` after its second paragraph below the options),
    then :func:`run_command`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n")[0],
        epilog=doc.split("\n\n", 2)[-1] if epilog and doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter,
    )
    parser.add_argument("--head", help="the head's gRPC address (default $SHOAL_HEAD or localhost:8470)")
    add_options(parser)
    parser.set_defaults(fn=fn)
    run_command(parser.parse_args(argv))


def settings_of(args: argparse.Namespace, flag_names: dict[str, str] | None = None, **flags: Any) -> Settings:
    """The settings of a command: ``flags`` (setting name -> the flag's value) over the
    config file and the environment. ``flag_names``: the flags, by setting, whose name is
    not the setting's (``--grace`` for ``shutdown_grace_s``), so that a message names the
    flag that was typed."""
    names = {"head_address": "--head", "state_dir": "--state", **(flag_names or {})}
    common = {
        "head_address": getattr(args, "head", None),
        "tls_dir": getattr(args, "tls_dir", None),
        "token": getattr(args, "token", None),
        "state_dir": getattr(args, "state", None),
    }
    return Settings.load(file=getattr(args, "config", None), flags={**common, **flags}, flag_names=names)


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more. Before, 'shoal deploy
    --timeout -1' applied the spec and then failed 'not ready after -1s'."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds, 0 or more, got {text!r}")
    return value


def in_range(what: str, value: int, high: int, low: int = 0) -> int:
    """``value`` when ``low <= value <= high``; else InvalidArgument naming ``what``.

    For a number the CLI sends in a protobuf field: ``high`` is the field's largest
    (:data:`INT32_MAX`, :data:`INT64_MAX`), since building the message with a larger one
    raises ValueError, which would be a traceback rather than an answer.
    """
    if not low <= value <= high:
        raise InvalidArgument(f"{what} must be an integer from {low} to {high}, got {value}")
    return value


def add_head_flag(p: argparse.ArgumentParser) -> None:
    """``--head`` after the command too (``shoal scheduler --head H``), as well as before it.

    SUPPRESS as the default: left out here, it does not overwrite the one given before the command.
    """
    p.add_argument(
        "--head",
        default=argparse.SUPPRESS,
        help="the head's gRPC address (default $SHOAL_HEAD or localhost:8470)",
    )


def add_client_flags(p: argparse.ArgumentParser) -> None:
    add_head_flag(p)
    p.add_argument("--tls-dir", help="the cluster's certificate folder (default $SHOAL_TLS_DIR)")
    p.add_argument("--token", help="bearer token for the head and for inference (default $SHOAL_TOKEN)")


def with_client(args: argparse.Namespace, fn: Callable[[Any, Settings], Awaitable[int]]) -> int:
    """Run ``fn(client, settings)`` with a client of the head (``shoal.api.AsyncClient``: the
    commands are built on the Python API); its result is the exit code."""
    from shoal.api import AsyncClient, head_silent, head_unreachable

    class CliClient(AsyncClient):
        point_at_head = CLI_POINT_AT_HEAD
        give_tls_dir = CLI_GIVE_TLS_DIR

    settings = settings_of(args)

    async def go() -> int:
        client = CliClient(settings=settings)
        try:
            return await fn(client, settings)
        except Unavailable as err:
            # The client's own calls to the head say so already (HeadUnreachable); an
            # Unavailable from elsewhere (a scheduler, a replica) is the head's fault only
            # when the head does not answer either.
            if isinstance(err, HeadUnreachable) or await _answers(client):
                raise
            raise head_unreachable(settings, err, point=CLI_POINT_AT_HEAD, tls=CLI_GIVE_TLS_DIR) from None
        except DeadlineExceeded as err:
            # A request that ran out of time at a scheduler is that request's answer; a head
            # that takes connections and never answers (hung, or not a shoal head) is named,
            # by the client's own calls to it already (HeadSilent).
            if isinstance(err, HeadSilent) or await _answers(client):
                raise
            raise head_silent(settings, err, point=CLI_POINT_AT_HEAD) from None
        finally:
            await client.close()

    return asyncio.run(go())


async def _answers(client: Any) -> bool:
    """Whether the head answers now: an UNAVAILABLE or a DEADLINE_EXCEEDED is blamed on it only
    when it does not."""
    try:
        await client.control.status()
    except ShoalError:
        return False
    return True


class ProgressLine:
    """One line that is redrawn in place on a terminal; in a log (not a tty), one line per change.
    Its control characters are written escaped (:func:`shoal.logs.escaped`): it quotes
    replicas' death reasons, the last lines of their logs."""

    def __init__(self, tty: bool | None = None) -> None:
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._drawn = False

    def show(self, line: str) -> None:
        line = escaped(line)
        if self.tty:
            print(f"\r{line}\033[K", end="", flush=True)
            self._drawn = True
        else:
            print(line, flush=True)

    def end(self) -> None:
        """Leave the line drawn so far, so the next output starts on a line of its own."""
        if self._drawn:
            print(flush=True)
            self._drawn = False


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart; no trailing spaces. A cell's
    control characters are written escaped (:func:`shoal.logs.escaped`): a replica's death
    reason is the last line of its log, which a model's crash writes raw, and its escape
    sequences reached the terminal of whoever ran ``shoal status``, its newlines made rows."""
    rows = [[escaped(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
