"""YAML as shoal reads its files (specs, routes, settings): PyYAML's safe loader, except that
a key given twice in one mapping is an error; and :func:`read_text`, how those files are read.

Why: YAML leaves a repeated key undefined and PyYAML keeps the last, silently. A spec with
``replicas: 1`` and further down ``replicas: 2`` deployed 2, and an operator who edited the
first line saw no change and no message.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from shoal.errors import InvalidArgument


def read_text(path: Path, what: str = "") -> str:
    """The text of ``path`` as UTF-8, read once: it may be a pipe (``/dev/stdin``, a shell's
    ``<(...)``), empty when read again. InvalidArgument ``cannot read [WHAT ]PATH: WHY`` when
    it cannot be read or is not UTF-8 (which printed a traceback)."""
    name = f"{what} {path}" if what else str(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InvalidArgument(f"cannot read {name}: {err.strerror or err}") from None
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
                    f"found the key {key!r} twice (first at line {first.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load(text: str) -> Any:
    """The one document in ``text``; yaml.YAMLError for a repeated key too."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_all(text: str) -> Iterator[Any]:
    """The documents in ``text`` (``---`` between them), as :func:`load`."""
    return yaml.load_all(text, Loader=_UniqueKeyLoader)
