"""Outlier detection on a hand-driven clock: ejection, growth and cap, the share limit, and the ways back."""

from __future__ import annotations

from typing import Any

from sidecar.catalog import Catalog, Reset, Upsert
from sidecar.config import OutlierSettings
from sidecar.health.outliers import OutlierDetector
from sidecar.metrics import Metrics
from sidecar.model import Agent, parse_agent
from sidecar.serving import servable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def agent(agent_id: str, caps: list[str], status: str = "healthy") -> Agent:
    return parse_agent({"id": agent_id, "name": "n", "address": "127.0.0.1", "port": 1, "capabilities": caps,
                        "health": {"status": status}})


def setup(agents: list[Agent], **settings: Any) -> tuple[OutlierDetector, Catalog, Clock]:
    clock = Clock()
    detector = OutlierDetector(OutlierSettings(**{"consecutive_failures": 3, "base_ejection_time": 10.0,
                                                  "max_ejection_time": 25.0, **settings}),
                               Metrics().health, clock)
    catalog = Catalog()
    catalog.subscribe(detector.on_snapshot)
    catalog.apply([Reset(1, {f"/services/n/{a.id}": a for a in agents})])
    return detector, catalog, clock


def fail(detector: OutlierDetector, agent_id: str, times: int, kind: str = "connect_error") -> None:
    for _ in range(times):
        detector.observe(agent_id, kind)


def test_consecutive_failures_eject_for_base_time_times_count_capped() -> None:
    detector, _, clock = setup([agent(f"a{i}", ["chat"]) for i in range(4)])
    fail(detector, "a0", 2)
    detector.observe("a0", "success")  # breaks the run
    fail(detector, "a0", 2)
    assert not detector.ejected("a0")
    fail(detector, "a0", 1, "failure_status")
    assert detector.ejected("a0")
    for ejections, duration in ((1, 10.0), (2, 20.0), (3, 25.0), (4, 25.0)):
        if ejections > 1:
            fail(detector, "a0", 3, "timeout")
        assert detector.ejected("a0")
        clock.now += duration - 0.01
        assert detector.ejected("a0"), ejections
        clock.now += 0.02
        assert not detector.ejected("a0"), ejections


def test_backpressure_is_not_a_failure() -> None:
    detector, _, _ = setup([agent("a0", ["chat"]), agent("a1", ["chat"])])
    fail(detector, "a0", 10, "backpressure")
    assert not detector.ejected("a0")


def test_never_more_than_the_share_of_a_capability() -> None:
    agents = [agent(f"a{i}", ["chat"]) for i in range(4)] + [agent("solo", ["vision"])]
    detector, _, _ = setup(agents, max_ejection_share=0.5)
    for agent_id in ("a0", "a1", "a2", "solo"):
        fail(detector, agent_id, 3)
    assert [detector.ejected(a.id) for a in agents] == [True, True, False, False, False]
    chat = [a for a in agents if "chat" in a.capabilities]
    assert [a.id for a in servable(chat, admitted=detector.admitted)] == ["a2", "a3"]


def test_a_published_recovery_ends_the_ejection() -> None:
    detector, catalog, _ = setup([agent("a0", ["chat"]), agent("a1", ["chat"])])
    fail(detector, "a0", 3)
    assert detector.ejected("a0")
    catalog.apply([Upsert("/services/n/a0", agent("a0", ["chat"], "unhealthy"), 2)])
    assert detector.ejected("a0")
    catalog.apply([Upsert("/services/n/a0", agent("a0", ["chat"], "healthy"), 3)])
    assert not detector.ejected("a0")


def test_disabled_and_deleted() -> None:
    detector, catalog, _ = setup([agent("a0", ["chat"]), agent("a1", ["chat"])], enabled=False)
    fail(detector, "a0", 10)
    assert not detector.ejected("a0")
    detector.update(OutlierSettings(consecutive_failures=1))
    fail(detector, "a0", 1)
    assert detector.ejected("a0")
    catalog.apply([Reset(4, {})])
    assert not detector.ejected("a0") and detector.ejected_count() == 0


def test_panic_serves_everyone_only_when_nobody_is_servable() -> None:
    up, down = agent("up", ["c"]), agent("down", ["c"], "unhealthy")
    unknown = agent("new", ["c"], "unknown")
    assert list(servable([up, down])) == [up]
    assert list(servable([up, down], panic=True)) == [up]
    assert list(servable([down])) == []
    assert list(servable([down], panic=True)) == [down]
    assert list(servable([unknown, down])) == [unknown]
    assert list(servable([up], admitted=lambda a: False)) == []
    assert list(servable([up, down], panic=True, admitted=lambda a: False)) == [up, down]
    assert list(servable([])) == [] and list(servable([], panic=True)) == []
