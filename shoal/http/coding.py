"""HTTP content codings (RFC 9110 8.4) on the REST inference route, both ways: a request
body sent gzip or deflate is decoded (:func:`decode`), and an answer goes compressed when
the client's ``Accept-Encoding`` asks for gzip or deflate (:func:`negotiate`,
:func:`encode`), as Triton's HTTP server answers tritonclient's
``response_compression_algorithm``.

deflate in HTTP is the zlib format (RFC 9110 8.4.1.2): tritonclient sends
``zlib.compress`` output and reads an answer with ``zlib.decompress``.
"""

from __future__ import annotations

import re
import zlib

from shoal.core import limits
from shoal.errors import BodyTooLarge, InvalidArgument

#: zlib's ``wbits`` for each coding shoal reads and writes.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

#: The most gzip members one request body may hold (:func:`_more_members`).
MAX_GZIP_MEMBERS = 64


def canonical(name: str) -> str:
    """A content coding's name as shoal knows it: trimmed, lower case, and ``x-gzip`` as
    ``gzip`` (RFC 9110 8.4.1.3: a recipient should take them for the same)."""
    name = name.strip().lower()
    return "gzip" if name == "x-gzip" else name


# ---------------------------------------------------------------- request bodies


def decode(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` as sent with Content-Encoding ``encoding`` (gzip, x-gzip, deflate, identity
    or none; a list of them, as several header lines make, with one coding besides
    identity at most), decoded: at most ``limit`` bytes, else BodyTooLarge;
    InvalidArgument for another coding, several, or data that is not in its coding."""
    name = canonical(encoding)
    if name in ("", "identity"):
        return body
    if name not in _WBITS:
        name = _one_coding(encoding)
        if name == "":
            return body
    inflater = zlib.decompressobj(_WBITS[name])
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidArgument(f"request body is not valid {name} data: {e}") from None
    if len(out) > limit:
        raise BodyTooLarge(limit, decoded=True)
    if not inflater.eof:
        raise InvalidArgument(f"request body is truncated {name} data")
    if inflater.unused_data:  # bytes after the stream: rare, so the common body pays one check
        out = _more_members(inflater.unused_data, out, name, limit)
    return out


def _one_coding(encoding: str) -> str:
    """The one coding (gzip or deflate; "" for none) a Content-Encoding list applies;
    InvalidArgument for another, or for several (a body compressed twice)."""
    names = [canonical(n) for n in encoding.split(",")]
    applied = [n for n in names if n not in ("", "identity")]
    if len(applied) > 1:
        raise InvalidArgument(
            f"Content-Encoding {limits.quoted(encoding.strip())} applies {len(applied)} codings; "
            "shoal decodes one (gzip or deflate)"
        )
    if applied and applied[0] not in _WBITS:
        raise InvalidArgument(
            f"unsupported Content-Encoding {limits.quoted(encoding.strip())}; use gzip, deflate or none"
        )
    return applied[0] if applied else ""


def _more_members(rest: bytes, out: bytes, encoding: str, limit: int) -> bytes:
    """``out`` and what follows the first compressed stream of a body: further gzip members
    (RFC 1952 2.2: a gzip body is a series of members, as ``cat a.gz b.gz`` makes, and gzip
    and Python's gzip module decode them all), or, as those allow, zero bytes of padding.
    Anything else is refused: before, a gzip body's later members and any bytes after a
    deflate or gzip stream were dropped silently, so a two-member body was read as its first
    member alone and junk after the stream went unnoticed. At most :data:`MAX_GZIP_MEMBERS`
    members: each costs Python work on the event loop, and a body of empty members could
    hold millions."""
    parts = [out]
    size = len(out)
    while rest:
        if len(parts) >= MAX_GZIP_MEMBERS:
            raise InvalidArgument(f"request body holds over {MAX_GZIP_MEMBERS} gzip members")
        if encoding != "gzip" or not rest.startswith(b"\x1f\x8b"):
            if encoding == "gzip" and not rest.strip(b"\0"):
                break  # padding
            raise InvalidArgument(f"request body has {len(rest)} bytes after the end of its {encoding} data")
        inflater = zlib.decompressobj(_WBITS["gzip"])
        try:
            part = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as e:
            raise InvalidArgument(f"request body is not valid {encoding} data: {e}") from None
        size += len(part)
        if size > limit:
            raise BodyTooLarge(limit, decoded=True)
        if not inflater.eof:
            raise InvalidArgument(f"request body is truncated {encoding} data")
        parts.append(part)
        rest = inflater.unused_data
    return b"".join(parts)


# ---------------------------------------------------------------- answers

#: An Accept-Encoding entry's parameters: its weight alone (RFC 9110 12.4.2).
_WEIGHT = re.compile(r"\s*;\s*[qQ]=(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)\s*")


def negotiate(accept: str) -> str:
    """The coding of an answer to a request whose Accept-Encoding is ``accept`` (RFC 9110
    12.5.3): ``"gzip"``, ``"deflate"`` or ``""`` (none). The acceptable one of highest
    weight wins: a coding not listed weighs what ``*`` does, or is not acceptable; no
    coding, when ``identity`` is not listed, is taken only when nothing else is
    acceptable. At equal weights gzip comes first, then deflate, then none. When nothing
    is acceptable (``*;q=0``) the answer goes uncompressed rather than as a 406. An entry
    whose weight is not a qvalue is ignored, as Triton ignores it."""
    weights: dict[str, float] = {}
    for entry in accept.split(","):
        name, semicolon, params = entry.partition(";")
        name = canonical(name)
        if not name:
            continue
        weight = 1.0
        if semicolon:
            match = _WEIGHT.fullmatch(semicolon + params)
            if match is None:
                continue
            weight = float(match[1])
        weights[name] = max(weight, weights.get(name, 0.0))  # gzip and x-gzip: the higher
    other = weights.get("*", 0.0)
    gzip = weights.get("gzip", other)
    deflate = weights.get("deflate", other)
    identity = weights.get("identity", 0.0)
    if gzip > 0 and gzip >= deflate and gzip >= identity:
        return "gzip"
    if deflate > 0 and deflate >= identity:
        return "deflate"
    return ""


MIN_BYTES = 1024
"""Answers shorter than this go uncompressed whatever Accept-Encoding says (Triton compresses
every one): most inference answers are a few hundred bytes, which gzip saves little of (or
makes longer) for 10-14 µs of zlib on each side, and requests and httpx send ``gzip,
deflate`` unasked. A client that accepts a coding accepts no coding too."""


def encode(body: bytes, name: str) -> bytes:
    """``body`` compressed in coding ``name`` (gzip or deflate) at zlib's default level, as
    Triton compresses. zlib lets go of the GIL while it compresses: a thread may run it."""
    return zlib.compress(body, wbits=_WBITS[name])
