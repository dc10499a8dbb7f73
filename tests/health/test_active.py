"""The scheduler's pure part: thresholds, start-up, flap damping and the loaded flag, on a hand-driven clock."""

from __future__ import annotations

from sidecar.health.active import Damping, Tracker
from sidecar.health.checks import Result
from sidecar.model import HEALTHY, UNHEALTHY, UNKNOWN

PASS, FAIL, LOADED = Result(True), Result(False), Result(True, loaded=True)


def run(tracker: Tracker, results: list[Result], start: float = 0.0, step: float = 2.0) -> list[str]:
    """Feed results one per ``step`` seconds; the status after each, with '*' where a write is due."""
    out = []
    for i, result in enumerate(results):
        changed = tracker.observe(result, start + i * step)
        out.append(tracker.verdict.status + ("*" if changed else ""))
    return out


def test_first_pass_is_healthy_at_once() -> None:
    assert run(Tracker(3, 2), [PASS, PASS]) == ["healthy*", "healthy"]


def test_unknown_until_failure_threshold() -> None:
    assert run(Tracker(3, 2), [FAIL, FAIL, FAIL, PASS]) == ["unknown", "unknown", "unhealthy*", "unhealthy"]


def test_thresholds_and_one_write_per_change() -> None:
    tracker = Tracker(3, 2)
    statuses = run(tracker, [PASS, FAIL, FAIL, PASS, FAIL, FAIL, FAIL, FAIL, PASS, PASS, PASS])
    assert statuses == ["healthy*", "healthy", "healthy", "healthy", "healthy", "healthy", "unhealthy*",
                        "unhealthy", "unhealthy", "healthy*", "healthy"]


def test_strictly_alternating_check_never_writes() -> None:
    tracker = Tracker(3, 2)
    statuses = run(tracker, [PASS] + [FAIL, PASS] * 50)
    assert statuses.count("healthy*") == 1 and not any(s.endswith("*") for s in statuses[1:])


def test_flapping_agent_is_held_unhealthy_until_the_penalty_decays() -> None:
    tracker = Tracker(3, 2, Damping(half_life=60.0, suppress=2.5, reuse=1.25))
    cycle = [FAIL, FAIL, FAIL, PASS, PASS]
    statuses = run(tracker, [PASS] + cycle * 4)
    writes = [s for s in statuses if s.endswith("*")]
    # up, then down/up, down/up, and the third fall: its recovery is held back.
    assert writes == ["healthy*", "unhealthy*", "healthy*", "unhealthy*", "healthy*", "unhealthy*"]
    assert tracker.verdict.status == UNHEALTHY and tracker.suppressed
    assert tracker.penalty(40.0) >= 1.25
    # Passing from then on: back only once the penalty (about 2.7 at the third fall, t=26 s)
    # has decayed below reuse, about 66 s later.
    later = run(tracker, [PASS] * 60, start=42.0, step=2.0)
    first_up = 42.0 + later.index("healthy*") * 2.0
    assert 85.0 <= first_up <= 100.0
    assert tracker.verdict.status == HEALTHY and not tracker.suppressed


def test_no_damping_when_half_life_is_zero() -> None:
    tracker = Tracker(1, 1, Damping(half_life=0.0))
    statuses = run(tracker, [PASS, FAIL] * 10)
    assert all(s.endswith("*") for s in statuses)


def test_loaded_flag_needs_agreeing_results() -> None:
    tracker = Tracker(3, 2)
    assert run(tracker, [PASS, LOADED, LOADED, LOADED, PASS, PASS]) == [
        "healthy*", "healthy", "healthy*", "healthy", "healthy", "healthy*"]
    assert not tracker.verdict.loaded


def test_loaded_at_first_pass_and_cleared_when_unhealthy() -> None:
    tracker = Tracker(1, 1)
    tracker.observe(LOADED, 0.0)
    assert tracker.verdict.loaded and tracker.verdict.status == HEALTHY
    assert tracker.observe(FAIL, 1.0)
    assert not tracker.verdict.loaded and tracker.verdict.status == UNHEALTHY
    assert Tracker(3, 2).verdict.status == UNKNOWN
