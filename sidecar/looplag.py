"""Event-loop lag: how late the loop runs a timer, so stalls (a long callback, a blocked loop) show.

Every ``interval`` seconds a timer is due; when it runs, the time past its due
time is observed. A loop busy with one callback for 300 ms shows up as a lag
of up to 300 ms; while it is stalled, nothing reads the sockets (the DNS UDP
listener's queue is then all that holds the queries arriving meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

INTERVAL = 0.1
# A lag this long is logged as well as counted.
WARN_AFTER = 1.0


class LoopLag:
    """A self-rescheduling timer that feeds its lateness to ``observe``."""

    def __init__(self, observe: Callable[[float], None], interval: float = INTERVAL) -> None:
        self.observe = observe
        self.interval = interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        """Start sampling on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._schedule(self._loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        lag = max(0.0, now - self._due)
        self.observe(lag)
        if lag >= WARN_AFTER:
            log.warning("event loop ran %.2fs late (a callback held it, or the process did not get the CPU)", lag)
        self._schedule(now)
