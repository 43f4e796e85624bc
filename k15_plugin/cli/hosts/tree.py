"""Nested option trees, as the hosts' command lines need them: dotted keys in, nested dicts merged, dotted keys out.

Both Ray-host doors build their run from a tree of derived options, merge the user's ``host.flags`` tree over it and
flatten the result into the host's dotted flags or overrides.
"""

from __future__ import annotations

import copy
from typing import Any


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted = "a.b.c"``, making the parents as needed."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def merged(base: dict, extra: dict, *, empty_replaces: bool = False) -> dict:
    """A copy of ``base`` with ``extra`` merged in, nested dicts key by key; ``extra`` wins on leaves. An empty dict in
    ``extra`` leaves a dict of ``base`` as it is, or replaces it with ``empty_replaces`` (a value of its own)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and (value or not empty_replaces) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value, empty_replaces=empty_replaces)
        else:
            out[key] = value
    return out


def leaves(tree: dict, prefix: str = "", *, empty_is_leaf: bool = False) -> dict[str, Any]:
    """``{"a.b.c": value}`` for every leaf of ``tree``; an empty dict is a leaf with ``empty_is_leaf``, else dropped.

    Example:
    ```python
    >>> from k15_plugin.cli.hosts.tree import leaves, merged
    >>> leaves(merged({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": {}}))
    {'a.b': 1, 'a.c': 3}
    >>> leaves({"a": {"b": {}}}, empty_is_leaf=True)
    {'a.b': {}}

    ```
    """
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and (value or not empty_is_leaf):
            out.update(leaves(value, f"{prefix}{key}.", empty_is_leaf=empty_is_leaf))
        else:
            out[f"{prefix}{key}"] = value
    return out
