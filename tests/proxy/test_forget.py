"""The proxy forgets the breakers, loads and breaker gauges of agents that leave the registry,
looking only at the agents a change names (a Reset, or the first change seen, checks all)."""

from __future__ import annotations

import dataclasses
import random

from sidecar.catalog import Catalog, Delete, Event, Reset, Upsert
from sidecar.config import Settings, build
from sidecar.metrics import Metrics
from sidecar.model import Agent
from sidecar.proxy.server import ProxyServer

from .conftest import agent


def key(a: Agent) -> str:
    return f"/services/{a.name}/{a.id}"


class Side:
    """A catalog and a ProxyServer subscribed to it (not listening: only its snapshot handling runs)."""

    def __init__(self, agents: list[Agent]) -> None:
        self.catalog = Catalog()
        self.catalog.apply([Reset(1, {key(a): a for a in agents})])
        self.metrics = Metrics()
        self.proxy = ProxyServer(build(Settings, {}), self.catalog, self.metrics.proxy)
        self.catalog.subscribe(self.proxy._on_snapshot)

    def apply(self, *events: Event) -> None:
        self.catalog.apply(list(events))

    def trip(self, agent_id: str) -> None:
        breakers = self.proxy.policy.breakers
        while breakers.state(agent_id) != "open":
            ticket = breakers.admit(agent_id)
            assert ticket is not None
            breakers.record(ticket, failed=True)

    def gauge(self, agent_id: str) -> float | None:
        return self.metrics.collector_registry.get_sample_value("sidecar_proxy_breaker_state", {"agent": agent_id})

    def breakers(self) -> set[str]:
        return set(self.proxy.policy.breakers.states())

    def loads(self, ids: list[str]) -> set[str]:
        return {i for i in ids if self.proxy.policy.loads.peek(i) is not None}


def test_deleted_agents_are_forgotten_busy_ones_later() -> None:
    agents = [agent(f"a{i}", port=8000 + i) for i in range(10)]
    side = Side(agents)
    loads = side.proxy.policy.loads
    for i in (1, 2, 3):
        side.trip(f"a{i}")
    loads.start("a3")  # a request to a3 is in flight
    side.apply(Upsert(key(agents[5]), dataclasses.replace(agents[5], weight=50), 2))  # first change: checks all
    assert side.breakers() == {"a1", "a2", "a3"} and side.gauge("a1") == 1
    side.apply(Delete(key(agents[1]), 3), Delete(key(agents[3]), 3))
    assert side.breakers() == {"a2"}
    assert side.gauge("a1") is None and side.gauge("a3") is None and side.gauge("a2") == 1
    assert loads.peek("a3") is not None  # still in flight: kept
    loads.finish("a3")
    side.apply(Upsert(key(agents[4]), dataclasses.replace(agents[4], weight=20), 4))  # any later change
    assert loads.peek("a3") is None
    # The agent at a key changed its id: the old id has left.
    side.apply(Upsert(key(agents[2]), dataclasses.replace(agents[2], id="b2"), 5))
    assert side.breakers() == set()
    # Gone and back in the same batch: kept.
    side.trip("a6")
    side.apply(Delete(key(agents[6]), 6), Upsert(key(agents[6]), agents[6], 6))
    assert side.breakers() == {"a6"}


def test_same_result_as_checking_every_agent() -> None:
    """Random changes, breakers and loads: the per-change result equals the check of every agent."""
    rng = random.Random(11)
    pool = [agent(f"a{i}", port=8000 + i) for i in range(40)]
    ids = [a.id for a in pool] + ["b0", "b1"]
    incremental, full = Side(pool[:20]), Side(pool[:20])
    for step in range(300):
        full.proxy._previous = None  # as if every change were the first: every agent is checked
        roll = rng.random()
        events: list[Event] = []
        for _ in range(rng.randint(1, 4)):
            a = rng.choice(pool)
            if rng.random() < 0.4:
                events.append(Delete(key(a), step + 2))
            elif rng.random() < 0.1:
                events.append(Upsert(key(a), dataclasses.replace(a, id=rng.choice(["b0", "b1"])), step + 2))
            else:
                events.append(Upsert(key(a), a, step + 2))
        # Requests (and so breakers and loads) only go to registered agents; they may end after it left.
        live = sorted(a.id for a in incremental.catalog.snapshot.agents.values())
        agent_id = rng.choice(live) if live and roll < 0.5 else rng.choice(ids)
        for side in (incremental, full):
            if roll < 0.3:
                side.trip(agent_id)
            elif roll < 0.5:
                side.proxy.policy.loads.start(agent_id)
            elif roll < 0.7:
                side.proxy.policy.loads.finish(agent_id)
            side.apply(*events)
        assert incremental.breakers() == full.breakers(), step
        assert incremental.loads(ids) == full.loads(ids), step
        assert all(incremental.gauge(i) == full.gauge(i) for i in ids), step
