"""JSON object bodies of the OpenAI API (``/v1``) and the generate extension: read, bounded,
and parsed off the event loop when large.

A body over ``max_json_on_loop_kb`` is parsed in the parsing process
(:mod:`shoal.http.offload`), as a large infer body is: a chat of 1,000,000 one-word
messages (34 MB) was parsed on the event loop twice, once by the token check for its
``model`` and once by its route, and every other request on the port waited about two
seconds. It is parsed once: :func:`parse_json` leaves the document in the request's scope
(:data:`PARSED`) for :func:`read_json`. A body holds at most :data:`MAX_JSON_VALUES` values.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any

from starlette.requests import Request

from shoal.core import limits
from shoal.errors import BodyTooLarge, Code, InvalidArgument, ShoalError, from_code
from shoal.http.offload import in_parser

MAX_JSON_VALUES = 100_000
"""Values (objects, lists, strings, numbers, ...) a body may hold. Their lists are bounded
once parsed (``max_strings_per_request``), but a body of a million small values took
seconds to parse and check: a request of 2,048 messages of a few parts each holds some
20,000."""


class TooManyValues(InvalidArgument):
    """A body of more than :data:`MAX_JSON_VALUES` values. ``model``: its ``model`` field
    ("" when it has no string one), so that the refusal is counted as that deployment's.
    ``param``: where its longest list (or object) is, ``messages.0.content`` say (OpenAI's
    error field), None when that is the body itself."""

    def __init__(self, message: str, model: str, param: str | None = None) -> None:
        super().__init__(message)
        self.model = model
        self.param = param


PARSED = "shoal.parsed_json"
"""The scope key under which :func:`parse_json` leaves what it parsed (the document, or the
ShoalError it was refused with), for :func:`read_json` to take instead of the body."""


async def read_json(request: Request, limit: int, on_loop: int) -> dict[str, Any]:
    """The body as a JSON object; InvalidArgument when it is not one, is over ``limit``
    bytes, or holds more than :data:`MAX_JSON_VALUES` values. Parsed off the event loop
    past ``on_loop`` bytes. What the token check parsed already (:data:`PARSED`) is taken
    as it is."""
    parsed = request.scope.get(PARSED)
    if parsed is None:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(limit, int(declared))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge(limit)
        return await parse_json(body, on_loop)
    if isinstance(parsed, ShoalError):
        raise parsed
    doc: dict[str, Any] = parsed
    return doc


async def parse_json(
    body: bytes | bytearray, on_loop: int, scope: MutableMapping[str, Any] | None = None
) -> dict[str, Any]:
    """``body`` as a JSON object (:func:`json_object`), parsed in the parsing process when
    it is over ``on_loop`` bytes. With ``scope``, what came of it is also left there
    (:data:`PARSED`), the refusal included."""
    try:
        if len(body) <= on_loop:
            doc = json_object(body)
        else:
            parsed = await in_parser(_json_object_in_child, bytes(body))
            if isinstance(parsed, tuple):
                code, message, model, param = parsed
                if model is not None:
                    raise TooManyValues(message, model, param)
                raise from_code(Code(code), message)
            doc = parsed
    except ShoalError as err:
        if scope is not None:
            scope[PARSED] = err
        raise
    if scope is not None:
        scope[PARSED] = doc
    return doc


def json_object(body: bytes | bytearray) -> dict[str, Any]:
    """``body`` as a JSON object of at most :data:`MAX_JSON_VALUES` values; InvalidArgument otherwise."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as err:  # too deeply nested: RecursionError
        raise InvalidArgument(f"request body is not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"request body must be a JSON object, got {type(doc).__name__}")
    longest = _longest_past(doc, MAX_JSON_VALUES)
    if longest is not None:
        path, size = longest
        model = doc.get("model")
        param = limits.shown(".".join(path)) if path else None
        raise TooManyValues(
            f"request body holds more than {MAX_JSON_VALUES} JSON values "
            f"({repr(param) if param else 'the body'} holds {size} items); send fewer or shorter lists",
            model if isinstance(model, str) else "",
            param,
        )
    return doc


def _json_object_in_child(
    body: bytes,
) -> dict[str, Any] | tuple[str, str, str | None, str | None]:
    """:func:`json_object` in the parsing process; an error comes back as (code, message,
    the model and param of a :class:`TooManyValues`, else None and None)."""
    try:
        return json_object(body)
    except TooManyValues as err:
        return (err.code.value, err.message, err.model, err.param)
    except ShoalError as err:
        return (err.code.value, err.message, None, None)


def _longest_past(doc: object, most: int) -> tuple[list[str], int] | None:
    """None when ``doc`` (parsed JSON) holds at most ``most`` values, counted without
    recursion and without walking past the bound; else the path and length of the longest
    list (or object) the walk met. Before, the message named the longest of the body's own
    fields: a chat of one message of 100,000 text parts was "'messages' holds 1 items"."""
    # Each container's place is its parent's and its key, made into a path for the longest only.
    Place = tuple[Any, str] | None
    stack: list[tuple[object, Place]] = [(doc, None)]
    seen = 1
    longest: tuple[Place, int] = (None, len(doc) if isinstance(doc, (dict, list)) else 0)
    while stack:
        value, place = stack.pop()
        items = (
            value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        )
        for key, item in items:
            seen += 1
            if isinstance(item, (dict, list)):
                inner = (place, str(key))
                if len(item) > longest[1]:
                    longest = (inner, len(item))
                stack.append((item, inner))
            if seen > most:
                path: list[str] = []
                at = longest[0]
                while at is not None:
                    at, key = at
                    path.append(key)
                return path[::-1], longest[1]
    return None
