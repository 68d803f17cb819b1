"""Bounds on a spec file before it is parsed: a spec is a few kilobytes of keys, not a decompression bomb.

YAML aliases let a tiny file expand into billions of values ("billion laughs"); loading it would hang and
exhaust memory. The file is composed into YAML's node graph first (aliases stay shared there, so this is
cheap), and the size it would expand to is counted before anything builds it.
"""

from __future__ import annotations

import yaml

from clip_tao.errors import ConfigError

MAX_SPEC_BYTES = 8 << 20
MAX_SPEC_VALUES = 1_000_000  # values after alias expansion; a real spec has hundreds


def check_spec_size(path: str, text: str) -> None:
    """Raise :class:`ConfigError` when ``text`` (the file at ``path``) is too large or expands too far."""
    if len(text) > MAX_SPEC_BYTES:
        raise ConfigError(f"spec file {path!r} is {len(text) >> 20} MiB: a spec is at most {MAX_SPEC_BYTES >> 20} MiB")
    if path.endswith(".json") or "*" not in text:  # no aliases, nothing to expand
        return
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # the real parser reports syntax errors with their position
    if root is not None and _expanded_size(root) > MAX_SPEC_VALUES:
        raise ConfigError(
            f"spec file {path!r} expands through YAML aliases (&/*) to more than {MAX_SPEC_VALUES:,} values: "
            "write the values out, or use fewer nested aliases"
        )


def _expanded_size(root: yaml.Node) -> int:
    """The number of nodes once every alias is replaced by a copy of its anchor (memoised, no recursion)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again is a self-referencing alias
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if children_done or not children:
            total = 1 + sum(sizes.get(id(c), 0) for c in children)
            sizes[id(node)] = min(total, MAX_SPEC_VALUES + 1)  # capped: big numbers stay cheap
            open_nodes.discard(id(node))
            continue
        if any(id(c) in open_nodes or c is node for c in children):
            return MAX_SPEC_VALUES + 1  # infinite expansion
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
