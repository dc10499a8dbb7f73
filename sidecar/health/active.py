"""The active-check scheduler: run a HealthCheck every interval (jittered), apply
thresholds and flap damping, and report each change of the published state once.

``Tracker`` is the pure part (results and a clock in, changes out);
``ActiveChecker`` is the thin loop around it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..config import HealthCheckSettings
from ..metrics import HealthMetrics
from ..model import HEALTHY, UNHEALTHY, UNKNOWN
from .checks import HealthCheck, Result

log = logging.getLogger(__name__)

JITTER = 0.1  # each sleep is interval x uniform(1 - JITTER, 1 + JITTER)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What is published about the agent: its status and whether it says it is loaded (HTTP 429)."""

    status: str = UNKNOWN
    loaded: bool = False
    detail: str = ""
    load: float | None = None  # the agent's reported load, published as metadata["load"]


# A reported load is published again when it moved by at least this much.
LOAD_STEP = 0.05


@dataclass(frozen=True, slots=True)
class Damping:
    """Route-flap damping of recoveries: each fall to unhealthy adds 1 to a penalty that
    halves every ``half_life`` seconds; while it is at or above ``suppress`` a recovery is
    held back (the agent stays unhealthy) until it decays below ``reuse``. Falls are never held.
    """

    half_life: float = 60.0
    suppress: float = 2.5  # about the third fall within a minute
    reuse: float = 1.25


class Tracker:
    """Consecutive-result thresholds with flap damping; time is passed in.

    From ``unknown`` a single pass is enough to become healthy (as Envoy does at
    start-up), so registration is not delayed by the success threshold.
    """

    def __init__(self, failure_threshold: int, success_threshold: int, damping: Damping | None = None) -> None:
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.damping = damping or Damping()
        self.verdict = Verdict()
        self.successes = 0
        self.failures = 0
        self.loaded_streak = 0
        self.suppressed = False
        self._penalty = 0.0
        self._penalty_at = 0.0

    def update(self, failure_threshold: int, success_threshold: int) -> None:
        """New thresholds, counted from the current streaks (the verdict and the flap penalty are kept)."""
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold

    def penalty(self, now: float) -> float:
        """The decayed flap penalty at ``now``."""
        if self._penalty == 0.0 or self.damping.half_life <= 0:
            return 0.0
        return self._penalty * math.pow(0.5, max(0.0, now - self._penalty_at) / self.damping.half_life)

    def observe(self, result: Result, now: float) -> bool:
        """Fold one result in; True when the verdict (status or loaded) changed and must be published."""
        if result.healthy:
            self.successes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.successes = 0
        old = self.verdict
        status = old.status
        if not result.healthy and self.failures >= self.failure_threshold and status != UNHEALTHY:
            status = UNHEALTHY
            if old.status == HEALTHY:
                self._penalty = self.penalty(now) + 1.0
                self._penalty_at = now
        elif result.healthy and status != HEALTHY:
            if status == UNKNOWN:
                status = HEALTHY
            elif self.successes >= self.success_threshold:
                penalty = self.penalty(now)
                limit = self.damping.reuse if self.suppressed else self.damping.suppress
                self.suppressed = self.damping.half_life > 0 and penalty >= limit
                if not self.suppressed:
                    status = HEALTHY
        # Loaded follows the results, but only after success_threshold results agree.
        self.loaded_streak = self.loaded_streak + 1 if result.loaded != old.loaded else 0
        if status != HEALTHY:
            loaded = False
        elif old.status != HEALTHY or self.loaded_streak >= self.success_threshold:
            loaded = result.loaded
        else:
            loaded = old.loaded
        if loaded != old.loaded:
            self.loaded_streak = 0
        load = old.load
        if result.load is None or old.load is None or abs(result.load - old.load) >= LOAD_STEP:
            load = result.load  # smaller moves are not worth an etcd write
        self.verdict = Verdict(status, loaded, result.detail, load)
        return (status, loaded, load) != (old.status, old.loaded, old.load)


class ActiveChecker:
    """Runs ``check`` forever; awaits ``on_change(verdict)`` after each change (and only then)."""

    def __init__(self, check: HealthCheck, kind: str, settings: HealthCheckSettings,
                 on_change: Callable[[Verdict], Awaitable[None]], metrics: HealthMetrics,
                 *, damping: Damping | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.check = check
        self.kind = kind
        self.settings = settings
        self.tracker = Tracker(settings.failure_threshold, settings.success_threshold, damping)
        self._on_change = on_change
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()

    @property
    def verdict(self) -> Verdict:
        return self.tracker.verdict

    def update(self, settings: HealthCheckSettings) -> None:
        """Hot-apply interval, timeout and thresholds; the current verdict is kept."""
        self.settings = settings
        self.tracker.update(settings.failure_threshold, settings.success_threshold)

    async def probe(self) -> Result:
        """One check, bounded by the timeout even if the check itself forgets to be."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.timeout * 2 + 0.5):
                result = await self.check.check()
        except TimeoutError:
            result = Result(False, detail=f"no verdict within {self.settings.timeout:g}s")
        except (OSError, ValueError) as exc:
            result = Result(False, detail=f"{type(exc).__name__}: {exc}")
        self._metrics.check_seconds.labels(self.kind).observe(time.perf_counter() - started)
        outcome = "fail" if not result.healthy else "loaded" if result.loaded else "pass"
        self._metrics.checks.labels(self.kind, outcome).inc()
        return result

    async def run(self) -> None:
        while True:
            result = await self.probe()
            tracker = self.tracker
            was_suppressed = tracker.suppressed
            if tracker.observe(result, self._clock()):
                verdict = tracker.verdict
                log.info("local agent is %s%s (%s)", verdict.status, ", loaded" if verdict.loaded else "",
                         verdict.detail)
                self._metrics.status_changes.labels(verdict.status).inc()
                self._metrics.status.set(1 if verdict.status == HEALTHY else 0)
                await self._on_change(verdict)
            if tracker.suppressed and not was_suppressed:
                self._metrics.suppressed_recoveries.inc()
                log.warning("local agent is flapping; holding it unhealthy until the flap penalty decays")
            self._metrics.flap_penalty.set(tracker.penalty(self._clock()))
            interval = self.settings.interval
            await asyncio.sleep(interval * self._rng.uniform(1 - JITTER, 1 + JITTER))
