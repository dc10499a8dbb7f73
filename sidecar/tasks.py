"""Stopping tasks without losing one's own cancellation.

``task.cancel(); try: await task; except CancelledError: pass`` cannot tell the
task's cancellation from the caller's: when the caller is cancelled while it
waits, the ``except`` swallows that, and the caller goes on running (a loop
that retries on errors then never ends). These helpers keep the two apart.
"""

from __future__ import annotations

import asyncio
from typing import Any


def cancelling() -> bool:
    """Whether the running task has been asked to stop (and has not un-cancelled)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(task: asyncio.Task[Any], timeout: float | None = None) -> BaseException | None:
    """Cancel ``task`` and wait (at most ``timeout``) until it has ended; its exception, if it
    failed otherwise than by being cancelled. The caller's own cancellation propagates."""
    task.cancel()
    await asyncio.wait({task}, timeout=timeout)
    if not task.done() or task.cancelled():
        return None
    return task.exception()
