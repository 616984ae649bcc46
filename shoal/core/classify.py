"""Triton's classification extension: an output's top k classes instead of its values.

A request asks for it per output, with the parameter ``classification`` (gRPC
``int64_param``, REST a JSON integer): k, the number of classes wanted. The doors check k
(:func:`check_count`), the scheduler the output's declared datatype
(:func:`check_datatype`); the replica, after its model ran, replaces the output with
:func:`top_k` of it, as Triton does:

* a BYTES tensor of strings ``"<value>:<index>"``, or ``"<value>:<index>:<label>"`` when
  the output declares a label for that index; ``<value>`` as C's ``%f`` writes it for a
  floating-point output (``0.975000``, what Triton's ``std::to_string`` writes), as a
  plain integer for an integer one;
* the classes in order of value, highest first (ties: the lower index first);
* of each row (axis 0) when the deployment batches (Triton's ``max_batch_size`` > 0), the
  rest of the row flattened: shape ``[rows, min(k, classes)]``; of the whole tensor
  flattened otherwise: shape ``[min(k, elements)]``. A k above the number of classes
  gives them all (Triton's clamp, not an error);
* of numeric outputs only: BOOL and BYTES have no order (InvalidArgument). FP16 and BF16
  are taken too (Triton refuses them).

Pure numpy; nothing here knows a transport.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shoal.core import limits, tensors
from shoal.errors import InvalidArgument

PARAMETER = "classification"
"""The parameter of a requested output that asks for its top k (gRPC and REST)."""

MAX_COUNT = 2**32 - 1
"""Largest k: Triton reads the count as a uint32. A k above an output's number of classes
gives all of them."""

NOT_CLASSIFIABLE = frozenset({"BOOL", "BYTES"})
"""Datatypes without an order to rank classes by."""
_FLOATS = frozenset({"FP16", "FP32", "FP64", "BF16"})


def check_count(name: str, value: object) -> int:
    """k for output ``name`` from its ``classification`` parameter; InvalidArgument, naming
    the output and the value, unless it is an integer in [1, :data:`MAX_COUNT`] (a bool, a
    float or a string is not, even ``3.0`` or ``"3"``)."""
    if type(value) is not int or not 1 <= value <= MAX_COUNT:
        raise InvalidArgument(
            f"output {limits.quoted(name)}: parameter {PARAMETER!r} must be a positive integer "
            f"(the number of classes to return) at most {MAX_COUNT}, got {limits.shown(repr(value))}"
        )
    return value


def check_datatype(name: str, datatype: str) -> None:
    """InvalidArgument when output ``name`` of ``datatype`` has no order to classify by."""
    if datatype in NOT_CLASSIFIABLE:
        raise InvalidArgument(
            f"output {limits.quoted(name)}: classification needs a numeric output, "
            f"and {limits.quoted(name)} is {datatype}"
        )


def top_k(
    name: str, values: np.ndarray[Any, Any], k: int, *, batched: bool, labels: Sequence[str] = ()
) -> np.ndarray[Any, Any]:
    """The top ``k`` classes of ``values`` (output ``name``), as the module says: an object
    array of ``bytes``, one row per row of ``values`` when ``batched``, flat otherwise.
    ``labels[i]`` names class i (none past the end of ``labels``). InvalidArgument for a
    BOOL or BYTES output."""
    datatype = tensors.datatype_of(values)
    check_datatype(name, datatype)
    per_row = batched and values.ndim >= 1
    # Not reshape(n, -1): an output of 0 rows has no -1 to work out.
    rows = values.reshape(values.shape[0], math.prod(values.shape[1:])) if per_row else values.reshape(1, -1)
    show = _integer
    if datatype in _FLOATS:
        rows = rows.astype(np.float64)  # exact for every float type; %f formats a double
        show = _float
    classes = rows.shape[1]
    count = min(k, classes)
    # A stable ascending sort of each row reversed, read backwards: highest value first,
    # and among equal values the lower index first (numpy has no stable descending sort,
    # and negating would wrap unsigned values).
    order = classes - 1 - np.argsort(rows[:, ::-1], axis=1, kind="stable")[:, ::-1][:, :count]
    out = np.empty((rows.shape[0], count), dtype=object)
    for r in range(rows.shape[0]):
        row = rows[r]
        for c, index in enumerate(order[r].tolist()):
            text = f"{show(row[index])}:{index}"
            if index < len(labels) and labels[index]:
                text = f"{text}:{labels[index]}"
            out[r, c] = text.encode("utf-8")
    return out if per_row else out.reshape(count)


def classified(
    outputs: Mapping[str, np.ndarray[Any, Any]],
    counts: Mapping[str, int],
    *,
    batched: bool,
    labels: Mapping[str, Sequence[str]],
) -> dict[str, np.ndarray[Any, Any]]:
    """``outputs`` with each output named in ``counts`` replaced by its :func:`top_k`. A name
    the model did not answer is left alone: the scheduler refuses it as an unknown output."""
    out = dict(outputs)
    for name, k in counts.items():
        values = out.get(name)
        if values is not None:
            out[name] = top_k(name, np.asarray(values), k, batched=batched, labels=labels.get(name, ()))
    return out


def _float(value: Any) -> str:
    return "%f" % value  # noqa: UP031 - C's %f, as Triton's std::to_string writes a float


def _integer(value: Any) -> str:
    return str(int(value))
