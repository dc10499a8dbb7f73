"""The pure policy parts with a controllable clock: breaker, affinity, limits, retries, choose()."""

from __future__ import annotations

import random

import pytest

from sidecar.catalog import Delete, Upsert
from sidecar.config import (
    CircuitBreakerSettings,
    LoadBalancerSettings,
    ProxySettings,
    RetrySettings,
    StickySettings,
)
from sidecar.errors import CircuitOpen, NoHealthyAgent, Overloaded, UnknownTarget
from sidecar.proxy.affinity import Affinity, cookie_value
from sidecar.proxy.breaker import Breakers
from sidecar.proxy.limits import Limits, TokenBucket
from sidecar.proxy.policy import Keys, Policy
from sidecar.proxy.retries import RetryBudget, safe_to_retry
from sidecar.proxy.routing import route

from .conftest import Clock, agent, catalog_of

CHAT = route("chat.agents.local", "agents.local")


def breakers(clock: Clock, threshold: int = 3, timeout: float = 10.0, trials: int = 1) -> Breakers:
    return Breakers(CircuitBreakerSettings(failure_threshold=threshold, timeout=timeout, half_open_requests=trials),
                    clock)


def fail(b: Breakers, agent_id: str, times: int) -> None:
    for _ in range(times):
        ticket = b.admit(agent_id)
        assert ticket is not None
        b.record(ticket, failed=True)


def test_breaker_trips_after_threshold_consecutive_failures() -> None:
    clock = Clock()
    b = breakers(clock)
    fail(b, "a", 2)
    ok = b.admit("a")
    assert ok is not None
    b.record(ok, failed=False)  # a success resets the count
    fail(b, "a", 2)
    assert b.state("a") == "closed"
    fail(b, "a", 1)
    assert b.state("a") == "open"
    assert b.admit("a") is None and not b.available("a")


def test_breaker_half_open_trial_then_recovery() -> None:
    clock = Clock()
    changes: list[tuple[str, str]] = []
    b = Breakers(CircuitBreakerSettings(failure_threshold=1, timeout=10.0, half_open_requests=2), clock,
                 listener=lambda agent_id, state: changes.append((agent_id, state)))
    fail(b, "a", 1)
    clock.advance(9.9)
    assert not b.available("a")
    clock.advance(0.2)
    assert b.available("a")
    first, second = b.admit("a"), b.admit("a")
    assert first is not None and second is not None and first.trial
    assert b.state("a") == "half_open" and b.admit("a") is None  # both trial slots taken
    b.record(first, failed=False)
    assert b.state("a") == "half_open"
    b.record(second, failed=False)
    assert b.state("a") == "closed"
    assert changes == [("a", "open"), ("a", "half_open"), ("a", "closed")]


def test_breaker_failed_trial_reopens_for_another_timeout() -> None:
    clock = Clock()
    b = breakers(clock, threshold=1)
    fail(b, "a", 1)
    clock.advance(10)
    trial = b.admit("a")
    assert trial is not None
    b.record(trial, failed=True)
    assert b.state("a") == "open"
    clock.advance(5)
    assert b.admit("a") is None
    clock.advance(5)
    assert b.admit("a") is not None


def test_breaker_late_reports_and_release() -> None:
    clock = Clock()
    b = breakers(clock, threshold=1)
    early = b.admit("a")
    fail(b, "a", 1)
    assert early is not None
    b.record(early, failed=False)  # began before the trip: does not close it
    assert b.state("a") == "open"
    clock.advance(10)
    trial = b.admit("a")
    assert trial is not None
    b.release(trial)  # never reached the agent: the slot is free again
    assert b.admit("a") is not None


def test_breaker_settings_update_and_disable() -> None:
    clock = Clock()
    b = breakers(clock, threshold=5)
    fail(b, "a", 2)
    b.update(CircuitBreakerSettings(failure_threshold=3, timeout=10.0))
    fail(b, "a", 1)
    assert b.state("a") == "open"
    b.update(CircuitBreakerSettings(enabled=False))
    assert b.available("a") and b.admit("a") is not None


def test_affinity_header_pins_survive_scale_out_and_move_on_failure() -> None:
    clock = Clock()
    affinity = Affinity(StickySettings(cookie_max_age=60), clock)
    a, b, c = agent("a"), agent("b"), agent("c")
    assert affinity.find("chat", "s1", None, [a, b]) is None
    affinity.pin("chat", "s1", b)
    assert affinity.find("chat", "s1", None, [a, b, c]) == b  # scale-out
    assert affinity.find("chat", "s1", None, [a, c]) is None  # b unusable: re-pin
    affinity.pin("chat", "s1", c)
    assert affinity.find("chat", "s1", None, [a, b, c]) == c
    clock.advance(61)
    assert affinity.find("chat", "s1", None, [a, b, c]) is None  # forgotten when idle too long


def test_affinity_cookie_carries_the_agent() -> None:
    affinity = Affinity(StickySettings(cookie_max_age=0))
    odd = agent("odd id;=")
    cookie = affinity.set_cookie(None, None, odd)
    assert cookie == "sidecar_affinity=odd%20id%3B%3D; Path=/; HttpOnly"
    value = cookie_value("x=1; " + cookie.split(";")[0], "sidecar_affinity")
    assert affinity.find("chat", None, value, [agent("a"), odd]) == odd
    assert affinity.set_cookie(None, value, odd) is None
    assert affinity.set_cookie("session", None, odd) is None


def test_token_bucket_and_concurrency_limits() -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0, now=0.0)
    assert bucket.take(0.0) == 0.0 and bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0
    clock = Clock()
    limits = Limits(ProxySettings(max_concurrency=2, rate_limit=100.0, rate_burst=10), clock)
    limits.acquire("chat")
    limits.acquire("chat")
    with pytest.raises(Overloaded) as exc:
        limits.acquire("chat")
    assert not exc.value.rate_limited
    limits.release("chat")
    limits.acquire("chat")
    limits.update(ProxySettings(rate_limit=1.0, rate_burst=1))
    limits.acquire("other")
    with pytest.raises(Overloaded) as exc:
        limits.acquire("other")
    assert exc.value.rate_limited and exc.value.retry_after == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("method", "sent", "replayable", "expected"),
    [
        (b"POST", False, False, True),
        (b"POST", True, True, False),
        (b"GET", True, True, True),
        (b"PUT", True, False, False),
        (b"DELETE", True, True, True),
        (b"PATCH", True, True, False),
    ],
)
def test_safe_to_retry(method: bytes, sent: bool, replayable: bool, expected: bool) -> None:
    assert safe_to_retry(method, sent, replayable) is expected


def test_retry_budget() -> None:
    clock = Clock()
    budget = RetryBudget(RetrySettings(budget=0.2, min_retries_per_second=0.0), clock)
    for _ in range(10):
        budget.request()
    assert budget.try_retry() and budget.try_retry()
    assert not budget.try_retry()
    clock.advance(11)  # the window slid past every request
    assert not budget.try_retry()
    floor = RetryBudget(RetrySettings(budget=0.0, min_retries_per_second=0.5), clock)
    assert [floor.try_retry() for _ in range(6)] == [True] * 5 + [False]


def policy(clock: Clock, **balancing: object) -> Policy:
    settings = LoadBalancerSettings(**balancing)  # type: ignore[arg-type]
    return Policy(settings, StickySettings(), ProxySettings(), clock=clock, rng=random.Random(5))


def test_choose_errors() -> None:
    clock = Clock()
    p = policy(clock, circuit_breaker=CircuitBreakerSettings(failure_threshold=1))
    with pytest.raises(UnknownTarget):
        p.choose(CHAT, catalog_of(agent("a", capabilities=("search",))).snapshot, Keys())
    with pytest.raises(NoHealthyAgent):
        p.choose(CHAT, catalog_of(agent("a", status="unhealthy")).snapshot, Keys())
    snapshot = catalog_of(agent("a"), agent("b", status="unhealthy")).snapshot
    fail(p.breakers, "a", 1)
    with pytest.raises(CircuitOpen):
        p.choose(CHAT, snapshot, Keys())
    with pytest.raises(NoHealthyAgent):
        p.choose(CHAT, catalog_of(agent("a")).snapshot, Keys(), exclude=["a"])


def test_choose_skips_full_and_backed_off_agents() -> None:
    clock = Clock()
    p = Policy(LoadBalancerSettings(), StickySettings(), ProxySettings(max_concurrency_per_agent=1), clock=clock)
    snapshot = catalog_of(agent("a"), agent("b")).snapshot
    p.loads.start("a")
    assert {p.choose(CHAT, snapshot, Keys()).agent.id for _ in range(20)} == {"b"}
    p.loads.start("b")
    with pytest.raises(Overloaded):
        p.choose(CHAT, snapshot, Keys())


def test_sticky_cookie_across_scale_out_and_failure() -> None:
    clock = Clock()
    p = policy(clock, algorithm="round_robin", circuit_breaker=CircuitBreakerSettings(failure_threshold=1))
    catalog = catalog_of(agent("a"), agent("b"))
    first = p.choose(CHAT, catalog.snapshot, Keys())
    assert first.set_cookie is not None
    cookie = cookie_value(first.set_cookie.split(";")[0], "sidecar_affinity")
    pinned = first.agent.id
    catalog.apply([Upsert(f"/services/chatbot/{i}", agent(i), 2) for i in ("c", "d", "e")])
    for _ in range(10):
        again = p.choose(CHAT, catalog.snapshot, Keys(affinity_cookie=cookie))
        assert again.agent.id == pinned and again.set_cookie is None
    fail(p.breakers, pinned, 1)
    moved = p.choose(CHAT, catalog.snapshot, Keys(affinity_cookie=cookie))
    assert moved.agent.id != pinned and moved.set_cookie is not None
    catalog.apply([Delete(f"/services/chatbot/{moved.agent.id}", 3)])
    assert p.choose(CHAT, catalog.snapshot, Keys(affinity_cookie=moved.agent.id)).agent.id != moved.agent.id


def test_sticky_header_across_scale_out_and_unhealthy() -> None:
    clock = Clock()
    p = policy(clock, algorithm="round_robin")
    catalog = catalog_of(agent("a"), agent("b"))
    pinned = {s: p.choose(CHAT, catalog.snapshot, Keys(session=s)).agent.id for s in ("s1", "s2", "s3", "s4")}
    catalog.apply([Upsert(f"/services/chatbot/{i}", agent(i), 2) for i in ("c", "d")])
    assert {s: p.choose(CHAT, catalog.snapshot, Keys(session=s)).agent.id for s in pinned} == pinned
    catalog.apply([Upsert("/services/chatbot/a", agent("a", status="unhealthy"), 3)])
    after = {s: p.choose(CHAT, catalog.snapshot, Keys(session=s)).agent.id for s in pinned}
    assert all(after[s] == pinned[s] for s in pinned if pinned[s] != "a")
    assert "a" not in after.values()


def test_per_capability_algorithm_and_live_update() -> None:
    clock = Clock()
    p = policy(clock, algorithm="weighted_random", per_capability={"chat": "round_robin"})
    assert p.algorithm(CHAT) == "round_robin"
    assert p.algorithm(route("search.agents.local", "agents.local")) == "weighted_random"
    p.update(LoadBalancerSettings(algorithm="least_conn"))
    assert p.algorithm(CHAT) == "least_conn"


def test_breaker_shortcut_for_closed_agents_agrees_with_pybreaker() -> None:
    """``available``/``admit`` skip pybreaker for agents not in ``_tripped``: through a random walk of
    failures, successes, trials, releases and time, ``_tripped`` is exactly the non-closed breakers."""
    rng = random.Random(7)
    clock = Clock()
    b = breakers(clock, threshold=2, timeout=5.0, trials=2)
    for _ in range(3000):
        agent_id = f"a{rng.randrange(3)}"
        ticket = b.admit(agent_id)
        if ticket is not None:
            if rng.random() < 0.2:
                b.release(ticket)
            else:
                b.record(ticket, failed=rng.random() < 0.4)
        clock.advance(rng.choice((0.0, 0.5, 3.0)))
        for each in ("a0", "a1", "a2"):
            state = b.state(each)
            assert (each in b._tripped) == (state != "closed")
            if state == "closed":
                assert b.available(each)
        if rng.random() < 0.01:
            b.retain(["a0", "a1"])


def test_selection_cache_follows_the_snapshot() -> None:
    """A route's agents are remembered per snapshot: a new snapshot (add, delete, health) is seen at once."""
    p = policy(Clock(), algorithm="round_robin")
    catalog = catalog_of(agent("a"), agent("b"))
    first = catalog.snapshot
    assert {p.choose(CHAT, first, Keys()).agent.id for _ in range(4)} == {"a", "b"}
    assert p.agents(CHAT, first) is p.agents(CHAT, first)
    catalog.apply([Upsert("/services/chatbot/c", agent("c"), 2), Delete("/services/chatbot/a", 3)])
    assert {p.choose(CHAT, catalog.snapshot, Keys()).agent.id for _ in range(4)} == {"b", "c"}
    catalog.apply([Upsert("/services/chatbot/b", agent("b", status="unhealthy"), 4)])
    assert {p.choose(CHAT, catalog.snapshot, Keys()).agent.id for _ in range(4)} == {"c"}
    assert {a.id for a in p.agents(CHAT, first)} == {"a", "b"}  # an old snapshot still means itself
