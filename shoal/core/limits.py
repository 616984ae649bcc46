"""Limits on what one request may ask of a scheduler, checked at ingress before any big
buffer is decoded. The numbers are settings (``shoal.config.Settings``)."""

from __future__ import annotations

from collections.abc import Iterable

from shoal.errors import InvalidArgument


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


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON's ``"\ud800"`` decodes to one): it
    cannot be encoded as UTF-8, so it cannot go on in a protobuf string or a JSON answer."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
