"""The event-loop lag probe: a blocked loop shows up as a late timer (sidecar_event_loop_lag_seconds)."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.looplag import LoopLag
from sidecar.metrics import Metrics

from .waiting import eventually

pytestmark = pytest.mark.asyncio


async def test_a_blocked_loop_is_observed_as_lag_at_least_as_long_as_the_block() -> None:
    seen: list[float] = []
    probe = LoopLag(seen.append, interval=0.05)
    probe.start()
    try:
        await eventually(lambda: len(seen) >= 2, timeout=30, what="two probes")
        time.sleep(0.4)  # noqa: ASYNC251 (the point: hold the loop; the timer, due within 0.05 s, runs >= 0.35 s late)
        count = len(seen)
        await eventually(lambda: len(seen) > count, timeout=30, what="the probe after the block")
        assert max(seen[count - 1:]) >= 0.35
        assert all(lag >= 0 for lag in seen)
    finally:
        probe.stop()
    stopped = len(seen)
    await asyncio.sleep(0.2)
    assert len(seen) == stopped, "no probe after stop()"


async def test_the_histogram_is_exported() -> None:
    metrics = Metrics()
    probe = LoopLag(metrics.runtime.loop_lag.observe, interval=0.01)
    probe.start()
    try:
        def count() -> float:
            text = metrics.exposition().decode()
            return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                        if s.name == "sidecar_event_loop_lag_seconds_count")
        await eventually(lambda: count() >= 3, timeout=30, what="three observations")
    finally:
        probe.stop()
