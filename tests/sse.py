"""Reading a server-sent event stream in tests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp


async def next_event(stream: aiohttp.ClientResponse, timeout: float = 20) -> tuple[str, str | None, dict[str, Any]]:
    """(event type, id or None, data) of the next event; comments (keepalives) are skipped."""
    kind, event_id, data = "", None, ""
    while True:
        line = (await asyncio.wait_for(stream.content.readline(), timeout)).decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and kind:
            return kind, event_id, json.loads(data)
