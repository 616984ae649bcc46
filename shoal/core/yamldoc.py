"""YAML as shoal reads its files (specs, routes, settings): PyYAML's safe loader, except that
a key given twice in one mapping is an error.

Why: YAML leaves a repeated key undefined and PyYAML keeps the last, silently. A spec with
``replicas: 1`` and further down ``replicas: 2`` deployed 2, and an operator who edited the
first line saw no change and no message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml


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
