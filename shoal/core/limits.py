"""Limits on what one request may ask of a scheduler, checked at ingress before any big
buffer is decoded. The numbers are settings (``shoal.config.Settings``)."""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal.errors import InvalidArgument

if TYPE_CHECKING:
    from shoal.config import Settings

#: The longest request id (characters) a client may send. Ids are echoed in answers and
#: written in log lines; a UUID is 36. Without a bound, one id could be as large as the
#: whole message (``max_message_mb``) and every refusal's log line with it.
MAX_REQUEST_ID_CHARS = 1024

MAX_SCHEDULER_ID_CHARS = 253
SCHEDULER_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_SCHEDULER_ID_CHARS - 1}}}")
"""What a scheduler id may be (``fullmatch``): a DNS name, as a Kubernetes node's name
(``--scheduler-id=$(NODE_NAME)``), fits, and so does the id a scheduler makes
(``sched-<hex>``). The head refuses others (``shoal.core.reports``): an id is in its status,
its events, its log lines and every routing table it sends."""

SCHEDULER_ID_RULES = (
    "letters, digits, '-', '_' and '.', starting with a letter or digit, "
    f"at most {MAX_SCHEDULER_ID_CHARS} characters"
)

MAX_HOST_CHARS = 253
"""The longest host a scheduler may advertise (setting ``advertise_host``): a DNS name's most."""


def scheduler_id_problem(scheduler_id: str) -> str | None:
    """What is wrong with ``scheduler_id`` (quoting at most :data:`SHOWN_CHARS` of it); None
    when it is a scheduler id (:data:`SCHEDULER_ID`)."""
    if SCHEDULER_ID.fullmatch(scheduler_id):
        return None
    if len(scheduler_id) > MAX_SCHEDULER_ID_CHARS:
        return (
            f"a scheduler id of {len(scheduler_id)} characters, over the limit of "
            f"{MAX_SCHEDULER_ID_CHARS}: {quoted(scheduler_id, 40)}"
        )
    return f"{quoted(scheduler_id)} is no scheduler id: {SCHEDULER_ID_RULES}"


#: How much of a client's string (a request id, a model name) a log line or an error
#: message quotes; the rest is counted, not written.
SHOWN_CHARS = 200

#: How much of a model's exception message an error carries (:func:`error_text`); the rest
#: is counted, not sent. As much as a log line shows of an exception's text
#: (``shoal.logs.EXCEPTION_TEXT_CHARS``), and within what a gRPC status message may take
#: (``shoal.rpc.status.MAX_DETAILS_BYTES``), so that no later cut hides how much this one cut.
ERROR_TEXT_CHARS = 2000


def elements(shape: object) -> int:
    """The element count of ``shape`` when it is a list of non-negative ints; 0 otherwise (the
    decoder then refuses the shape itself, naming the problem)."""
    if not isinstance(shape, list | tuple):
        return 0
    count = 1
    for d in shape:
        if type(d) is not int or d < 0:  # bool is no dimension (type(True) is bool)
            return 0
        count *= d
    return count


def check_elements(shapes: Iterable[object], limit: int) -> None:
    """InvalidArgument when the tensors of one request hold more than ``limit`` elements
    together (``limit`` <= 0: no limit)."""
    if limit <= 0:
        return
    total = 0
    for shape in shapes:
        total += elements(shape)
        if total > limit:
            raise InvalidArgument(
                f"the request's tensors hold over {limit} elements (setting max_tensor_elements)"
            )


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one inference request may carry; 0 is no limit. Every door checks these before
    it does any work per tensor, so a request past them costs nothing but its parse."""

    elements: int = 0  # setting max_tensor_elements: all inputs together
    tensors: int = 0  # setting max_tensors_per_request: inputs, and outputs asked for

    @classmethod
    def of(cls, settings: Settings) -> RequestLimits:
        return cls(settings.max_tensor_elements, settings.max_tensors_per_request)

    def check_counts(self, inputs: int, outputs: int = 0) -> None:
        """InvalidArgument when the request names more input tensors, or asks for more
        output tensors, than ``tensors``. Why a limit: each tensor costs Python work in the
        ingress and the replica, and a request of 50,000 one-element inputs (1.2 MB over
        gRPC) held every other request on that ingress process for 1.3 s."""
        limit = self.tensors
        if limit <= 0:
            return
        if inputs > limit:
            raise InvalidArgument(
                f"the request has {inputs} inputs, over the limit of {limit} "
                "(setting max_tensors_per_request)"
            )
        if outputs > limit:
            raise InvalidArgument(
                f"the request asks for {outputs} outputs, over the limit of {limit} "
                "(setting max_tensors_per_request)"
            )

    def check_elements(self, shapes: Iterable[object]) -> None:
        check_elements(shapes, self.elements)


def check_timeout(timeout_s: float) -> None:
    """InvalidArgument unless ``timeout_s`` (a request's deadline, 0: the deployment's) is a
    finite number, 0 or more: the scheduler's check of a native request, and the client's
    before it sends one."""
    if timeout_s < 0 or not math.isfinite(timeout_s):
        raise InvalidArgument(f"timeout_s must be a finite number >= 0, got {timeout_s:g}")


def check_request_id(request_id: str) -> None:
    """InvalidArgument when ``request_id`` is longer than MAX_REQUEST_ID_CHARS."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(
            f"the request id is {len(request_id)} characters, over the limit of {MAX_REQUEST_ID_CHARS}"
        )


def shown(text: str, most: int = SHOWN_CHARS) -> str:
    """``text`` as a log line or an error message quotes a client's string: at most ``most``
    characters, and how many more were left out."""
    if len(text) <= most:
        return text
    return f"{text[:most]}... ({len(text) - most} more characters)"


def error_text(err: BaseException, most: int = ERROR_TEXT_CHARS) -> str:
    """``TypeName: message`` of an exception a model (or any code shoal runs) raised, for an
    error that a client and log lines get: at most ``most`` characters of its message, and
    how many more were left out. A model raising ``ValueError("x" * 5_000_000)`` (a message
    quoting its whole input, a huge repr) had all of it built into the request's error, and
    cut later only to fit a gRPC trailer, that cut then counting what it cut of the first.
    An exception whose ``str()`` itself fails is named by its type."""
    try:
        text = str(err)
    except Exception as failed:  # a model's own __str__ is as fallible as its predict
        text = f"(its message could not be read: str() raised {type(failed).__name__})"
    return f"{type(err).__name__}: {shown(text, most)}"


def quoted(text: str, most: int = SHOWN_CHARS) -> str:
    """``text`` in quotes (its repr) as an error message names a client's string (a tensor
    name, a header): at most ``most`` characters of it, and how many more were left out.
    Both doors name tensors so: before, a REST error repeated a 1 MiB tensor name whole."""
    if len(text) <= most:
        return repr(text)
    return f"{text[:most]!r}... ({len(text) - most} more characters)"


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr, for any value: an integer too long to show (``repr`` refuses
    one of over 4,300 digits) is named by its length."""

    def repr_int(self, x: int, level: int) -> str:
        if abs(x) >= 10**SHOWN_CHARS:
            digits = int((abs(x).bit_length() - 1) * math.log10(2)) + 1
            return f"<an integer of {digits + (abs(x) >= 10**digits)} digits>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()
_SHORT.maxstring = _SHORT.maxother = SHOWN_CHARS
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 4, 4, 4


def short_repr(value: object) -> str:
    """``value``'s repr as an error message quotes a user's value (a setting from a file): at
    most a few items of a list or mapping, two levels deep, and :data:`SHOWN_CHARS` characters
    of a string. Before, a config file's ``host: *a`` whose alias ``a`` was nine levels of
    nine-fold lists (9**9 items from 1 KB of YAML) was printed whole, and never finished."""
    return _SHORT.repr(value)


#: Most stop strings one generation may ask for, and the longest. Every new piece of text is
#: searched for each of them (``shoal.backends.generate.StopMatcher``): 10,000 stop strings
#: were taken as they came, a search of the whole text for each at every token, on the
#: model's one generation thread. OpenAI's API takes 4.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512


def stop_problem(stop: tuple[str, ...] | list[str]) -> str | None:
    """What is wrong with a generation's ``stop`` strings past their bounds; None if nothing."""
    if len(stop) > MAX_STOP_STRINGS:
        return f"stop holds {len(stop)} strings, over the limit of {MAX_STOP_STRINGS}"
    longest = max((len(s) for s in stop), default=0)
    if longest > MAX_STOP_CHARS:
        return f"a stop string of {longest} characters, over the limit of {MAX_STOP_CHARS}"
    return None


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON's ``"\ud800"`` decodes to one): it
    cannot be encoded as UTF-8, so it cannot go on in a protobuf string or a JSON answer."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
