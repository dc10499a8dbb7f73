"""Retry policy: when a failed attempt may go to another agent, and a budget
that keeps retries a small fraction of requests (Linkerd/Finagle style) so an
outage cannot become a retry storm. Pure: the clock is passed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import RetrySettings

IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
WINDOW = 10


def safe_to_retry(method: bytes, sent: bool, replayable: bool) -> bool:
    """A failed attempt may be retried when nothing reached the agent, or when the
    method is idempotent and its whole body is still at hand to send again."""
    if not sent:
        return True
    return method in IDEMPOTENT and replayable


class RetryBudget:
    """Allows ``budget`` retries per request plus ``min_retries_per_second``, over a
    sliding window of one-second buckets."""

    def __init__(self, settings: RetrySettings, clock: Callable[[], float] = time.monotonic,
                 window: int = WINDOW) -> None:
        self.settings = settings
        self._clock = clock
        self._window = window
        # second -> [requests, retries]
        self._buckets: dict[int, list[int]] = {}

    def update(self, settings: RetrySettings) -> None:
        """Swap settings live."""
        self.settings = settings

    def _bucket(self) -> list[int]:
        second = int(self._clock())
        bucket = self._buckets.get(second)
        if bucket is None:
            horizon = second - self._window
            for old in [s for s in self._buckets if s <= horizon]:
                del self._buckets[old]
            bucket = self._buckets[second] = [0, 0]
        return bucket

    def request(self, count: int = 1) -> None:
        """Count ``count`` original requests (now)."""
        self._bucket()[0] += count

    def try_retry(self) -> bool:
        """Spend budget on one retry; False when the budget is exhausted."""
        current = self._bucket()
        requests = sum(b[0] for b in self._buckets.values())
        retries = sum(b[1] for b in self._buckets.values())
        allowed = self.settings.budget * requests + self.settings.min_retries_per_second * self._window
        if retries + 1 > allowed:
            return False
        current[1] += 1
        return True
