"""Waiting on a condition in tests: bounded, polling, never a timing assertion."""

from __future__ import annotations

import asyncio
from typing import Any


async def eventually(predicate: Any, timeout: float = 20.0, what: str = "condition", step: float = 0.05) -> float:
    """Await ``predicate()`` (sync or async) until true; returns the seconds it took. Fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return loop.time() - started
        if loop.time() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(step)
