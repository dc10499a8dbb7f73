"""Flow control: concurrency per target and per agent (Envoy's circuit-breaking
thresholds) and an optional token-bucket rate limit per target. Pure: the clock
is passed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import ProxySettings
from ..errors import Overloaded


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 on success, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Limits:
    """Counts requests in flight per target; answers Overloaded when a limit is hit."""

    def __init__(self, settings: ProxySettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._active: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}

    def update(self, settings: ProxySettings) -> None:
        """Swap limits live (buckets restart full at the new rate)."""
        self.settings = settings
        self._buckets.clear()

    def acquire(self, target: str) -> None:
        """Count one request to ``target`` in; raises Overloaded (rate limit first, then concurrency)."""
        settings = self.settings
        if settings.rate_limit > 0:
            bucket = self._buckets.get(target)
            now = self._clock()
            if bucket is None:
                burst = float(settings.rate_burst or max(1, int(settings.rate_limit)))
                bucket = self._buckets[target] = TokenBucket(settings.rate_limit, burst, now)
            wait = bucket.take(now)
            if wait:
                raise Overloaded(target, f"rate limit of {settings.rate_limit:g}/s reached", retry_after=wait,
                                 rate_limited=True)
        active = self._active.get(target, 0)
        if active >= settings.max_concurrency:
            raise Overloaded(target, f"{active} requests in flight (proxy.max_concurrency)")
        self._active[target] = active + 1

    def release(self, target: str) -> None:
        """Count one request to ``target`` out."""
        active = self._active.get(target, 0) - 1
        if active > 0:
            self._active[target] = active
        else:
            self._active.pop(target, None)

    def agent_has_room(self, in_flight: int) -> bool:
        """Whether an agent with ``in_flight`` requests may take one more."""
        return in_flight < self.settings.max_concurrency_per_agent

    def active(self, target: str) -> int:
        """Requests in flight to ``target``."""
        return self._active.get(target, 0)
