"""RFC 6902 JSON Patch between two JSON documents: pure, used by the webhook to express an injection."""

from __future__ import annotations

import json
from typing import Any


def pointer(parts: list[str | int]) -> str:
    """An RFC 6901 JSON Pointer: ``~`` becomes ``~0`` and ``/`` becomes ``~1`` in every key."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def diff(before: Any, after: Any) -> list[dict[str, Any]]:
    """Operations that turn ``before`` into ``after``.

    A key or list that ``before`` lacks is added whole, so every parent exists before anything is added
    under it. Items after a list's old ones are appended with ``/-``; otherwise new items are taken to be in
    front (inserted at their index) and the old ones are compared one by one. A list that shrank, or a
    change of type, is replaced.
    """
    ops: list[dict[str, Any]] = []
    _diff(before, after, [], ops)
    return ops


def _diff(before: Any, after: Any, path: list[str | int], ops: list[dict[str, Any]]) -> None:
    if _same(before, after):
        return
    if isinstance(before, dict) and isinstance(after, dict):
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": pointer([*path, key])})
        for key, value in after.items():
            if key in before:
                _diff(before[key], value, [*path, key], ops)
            else:
                ops.append({"op": "add", "path": pointer([*path, key]), "value": value})
        return
    if isinstance(before, list) and isinstance(after, list) and len(after) >= len(before):
        extra = len(after) - len(before)
        if extra and _same(after[:len(before)], before):
            ops.extend({"op": "add", "path": pointer(path) + "/-", "value": v} for v in after[len(before):])
            return
        # Otherwise the new items went in front (the sidecar container) and the old ones may have changed.
        ops.extend({"op": "add", "path": pointer([*path, i]), "value": after[i]} for i in range(extra))
        for i, old in enumerate(before):
            _diff(old, after[extra + i], [*path, extra + i], ops)
        return
    ops.append({"op": "replace", "path": pointer(path), "value": after})


def _same(a: Any, b: Any) -> bool:
    # Python's == has 1 == True == 1.0; JSON does not.
    return a == b and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
