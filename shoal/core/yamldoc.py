"""YAML as shoal reads its files (specs, routes, settings): PyYAML's safe loader, except that
a key given twice in one mapping is an error, and so is an integer too long for Python to
read; and :func:`read_text`, how those files are read (at most :data:`MAX_FILE_BYTES`).

Why: YAML leaves a repeated key undefined and PyYAML keeps the last, silently. A spec with
``replicas: 1`` and further down ``replicas: 2`` deployed 2, and an operator who edited the
first line saw no change and no message.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from shoal.core.limits import short_repr
from shoal.errors import InvalidArgument

MAX_FILE_BYTES = 8 * 1024 * 1024
"""Largest YAML file shoal reads: the largest spec within its bounds, indented, takes about
1.3 MB (``shoal.core.spec.MAX_SPEC_JSON``), and PyYAML reads about 0.2 MB a second. Before,
a file was read whole, whatever its size: ``shoal deploy /dev/zero`` (or ``--config``) took
memory until the machine had none."""


def read_text(path: Path, what: str = "", most: int = MAX_FILE_BYTES) -> str:
    """The text of ``path`` as UTF-8, read once: it may be a pipe (``/dev/stdin``, a shell's
    ``<(...)``), empty when read again. InvalidArgument ``cannot read [WHAT ]PATH: WHY`` when
    it cannot be read, is not UTF-8 (which printed a traceback) or holds more than ``most``
    bytes (only ``most`` + 1 are read)."""
    name = f"{what} {path}" if what else str(path)
    try:
        with path.open("rb") as f:
            data = f.read(most + 1)
    except OSError as err:
        raise InvalidArgument(f"cannot read {name}: {err.strerror or err}") from None
    if len(data) > most:
        raise InvalidArgument(f"cannot read {name}: over the limit of {most} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise InvalidArgument(
            f"cannot read {name}: not UTF-8 (byte 0x{data[err.start]:02x} at position {err.start})"
        ) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # The mapping's own keys, before merge keys (``<<``) bring theirs in, which its own
        # may override: that is what merging is for.
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            first = seen.get(key)
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {short_repr(key)} twice (first at line {first.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        # Python reads at most 4,300 digits (sys.get_int_max_str_digits): a longer integer
        # was a ValueError traceback rather than a line naming the file.
        try:
            return int(super().construct_yaml_int(node))
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} characters, too long to read", node.start_mark
            ) from None


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


def problem(err: yaml.YAMLError) -> str:
    """``err`` in one line, where it is in the file first: ``line 4, column 11: found the key
    'replicas' twice (first at line 2), while reading a mapping at line 1``. PyYAML's own
    message takes five lines, each place in ``"<unicode string>"`` with an excerpt, where
    every refusal of a shoal command is one line."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return " ".join(str(err).split())
    mark = err.problem_mark or err.context_mark
    parts = [f"line {mark.line + 1}, column {mark.column + 1}"] if mark else []
    parts.append(err.problem or err.context or "not valid YAML")
    line = ": ".join(parts)
    if err.problem and err.context:
        at = f" at line {err.context_mark.line + 1}" if err.context_mark else ""
        line += f", {err.context}{at}"
    return line


def load(text: str) -> Any:
    """The one document in ``text``; yaml.YAMLError for a repeated key too."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_all(text: str) -> Iterator[Any]:
    """The documents in ``text`` (``---`` between them), as :func:`load`."""
    return yaml.load_all(text, Loader=_UniqueKeyLoader)
