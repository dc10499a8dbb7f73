"""docs/configuration.md lists every settings key with its default and whether it is live (no I/O)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sidecar.config import Settings

DOC = Path(__file__).parent.parent / "docs" / "configuration.md"
ROW = re.compile(r"^\| `(?P<key>[a-z0-9_.]+)` \| (?P<default>.*?) \| (?P<live>live|restart) \| .+ \|$")


def schema(obj: Any = None, path: str = "", restart: bool = False) -> Iterator[tuple[str, str, str]]:
    """(dotted key, default as the doc writes it, live|restart) of every setting."""
    obj = Settings() if obj is None else obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        needs_restart = restart or bool(f.metadata.get("restart"))
        if dataclasses.is_dataclass(value):
            yield from schema(value, f"{path}{f.name}.", needs_restart)
            continue
        if isinstance(value, tuple) and value == tuple(range(500, 600)):
            shown = "`500-599`"
        else:
            plain = dict(value) if hasattr(value, "items") else list(value) if isinstance(value, tuple) else value
            shown = f"`{json.dumps(plain)}`"
        yield f"{path}{f.name}", shown, "restart" if needs_restart else "live"


def test_every_key_is_documented_with_its_default_and_liveness() -> None:
    rows = {m["key"]: (m["default"], m["live"]) for m in map(ROW.match, DOC.read_text().splitlines()) if m}
    expected = {key: (default, live) for key, default, live in schema()}
    assert sorted(set(expected) - set(rows)) == [], "settings missing from docs/configuration.md"
    assert sorted(set(rows) - set(expected)) == [], "docs/configuration.md lists keys that do not exist"
    wrong = {key: (rows[key], want) for key, want in expected.items() if rows[key] != want}
    assert wrong == {}, "(documented, actual) default and liveness differ"
