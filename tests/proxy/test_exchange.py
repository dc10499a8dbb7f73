"""The exchange state machine alone: events in, actions out; no sockets, no loop, a clock by hand."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry

from sidecar.catalog import Catalog
from sidecar.config import CircuitBreakerSettings, LoadBalancerSettings, ProxySettings, StickySettings
from sidecar.errors import Overloaded, TaskOwnerUnavailable, UpstreamError, UpstreamTimeout
from sidecar.metrics import ProxyMetrics
from sidecar.proxy.exchange import (
    ABORT,
    ANSWER,
    CLOSE,
    GONE,
    POOL,
    PROCEED,
    RELAY,
    RETRY,
    SEND,
    UPGRADE,
    Machine,
)
from sidecar.proxy.heads import Keys
from sidecar.proxy.policy import Policy
from sidecar.proxy.routing import Route, route

from .conftest import Clock, agent, catalog_of

CHAT = route("chat.agents.local", "agents.local")
OUTSIDE = route("example.com:8080", "agents.local")


class Rig:
    """A policy, metrics and a catalog of agents a, b, c (or the given ones)."""

    def __init__(self, *ids: str, proxy: ProxySettings | None = None, threshold: int = 5) -> None:
        self.clock = Clock()
        balancing = LoadBalancerSettings(circuit_breaker=CircuitBreakerSettings(failure_threshold=threshold))
        self.policy = Policy(balancing, StickySettings(enabled=False), proxy or ProxySettings(), clock=self.clock,
                             rng=random.Random(7))
        self.metrics = ProxyMetrics(CollectorRegistry())
        self.catalog: Catalog = catalog_of(*(agent(i, port=8000 + n) for n, i in enumerate(ids or ("a", "b", "c"))))

    def machine(self, method: bytes = b"GET", target: Route = CHAT) -> Machine:
        return Machine(self.policy, self.metrics, self.catalog, target, Keys(), method, self.clock())

    def in_flight(self, agent_id: str) -> int:
        return self.policy.loads.in_flight(agent_id)

    def admitted(self) -> int:
        """Requests counted in at CHAT's target (the concurrency limit's count)."""
        return self.policy.limits.active(CHAT.key)


def start(rig: Rig, m: Machine) -> str:
    """Admit, choose and depart: the id of the agent the request was sent to."""
    assert m.admit() == PROCEED
    return attempt(rig, m)


def attempt(rig: Rig, m: Machine) -> str:
    """Choose and depart (another attempt): the agent's id."""
    assert m.choose() == SEND
    assert m.choice is not None
    m.depart(rig.clock())
    return m.choice.agent.id


def test_success_relays_and_pools() -> None:
    rig = Rig()
    m = rig.machine()
    picked = start(rig, m)
    assert rig.in_flight(picked) == 1 and rig.admitted() == 1
    rig.clock.advance(0.01)
    assert m.head(200, [], False, True, rig.clock()) == RELAY
    assert m.fold  # the success opened a batch: the driver folds it at the end of the loop turn
    assert m.reported == "success"
    assert rig.metrics.attempts["success"] == 1 and rig.metrics.requests[("capability", "chat", "ok")] == 1
    assert m.ended(False, True, False, True) == POOL
    assert m.keep and rig.in_flight(picked) == 0 and rig.admitted() == 0
    assert m.tried == [picked]


def test_pool_or_close() -> None:
    rig = Rig()
    for keep_alive, no_body, body_done, action in ((True, False, True, POOL), (False, False, True, CLOSE),
                                                   (True, True, True, CLOSE), (True, False, False, CLOSE)):
        m = rig.machine()
        start(rig, m)
        assert m.head(200, [], False, True, rig.clock()) == RELAY
        assert m.ended(False, keep_alive, no_body, body_done) == action
        assert m.keep
    m = rig.machine()
    start(rig, m)
    m.head(200, [], False, True, rig.clock())
    assert m.ended(True, True, False, True) == ABORT  # cut short mid-body
    assert not m.keep and rig.admitted() == 0


def test_reset_before_first_byte_retries_elsewhere() -> None:
    rig = Rig()
    m = rig.machine()
    first = start(rig, m)
    reset = UpstreamError("", "the agent closed the connection before responding")
    assert m.attempt_failed(reset, True, False, rig.clock()) == RETRY
    assert m.choice is None and rig.in_flight(first) == 0
    assert m.reported == "reset" and rig.metrics.attempts["reset"] == 1
    assert rig.metrics.retries._value.get() == 1  # type: ignore[attr-defined]
    second = attempt(rig, m)
    assert second != first and m.tried == [first, second]
    assert m.head(200, [], False, True, rig.clock()) == RELAY
    assert m.ended(False, True, False, True) == POOL
    assert rig.admitted() == 0


def test_no_retry_when_the_request_cannot_be_sent_again() -> None:
    rig = Rig()
    # A POST whose bytes reached the agent: not idempotent.
    m = rig.machine(b"POST")
    picked = start(rig, m)
    assert m.attempt_failed(UpstreamError("", "reset"), True, False, rig.clock()) == ANSWER
    assert m.error is not None and m.error.agent_id == picked and m.error.target == CHAT.host
    m.release()
    # A GET whose body is no longer at hand (streamed past the replay limit).
    m = rig.machine()
    start(rig, m)
    assert m.attempt_failed(UpstreamError("", "reset"), False, False, rig.clock()) == ANSWER
    m.release()
    # A POST that never reached the agent (connect refused): safe anywhere.
    m = rig.machine(b"POST")
    start(rig, m)
    assert m.connect_failed(UpstreamError("", "refused"), False, False, rig.clock()) == RETRY
    assert m.reported == "connect_error"
    assert rig.admitted() == 1
    m.release()
    assert rig.admitted() == 0


def test_no_retry_after_the_first_byte_relayed() -> None:
    """Once the head is relayed, a failure cuts the response short: abort, never another attempt."""
    rig = Rig()
    m = rig.machine()
    picked = start(rig, m)
    assert m.head(200, [], False, True, rig.clock()) == RELAY
    assert m.ended(True, True, False, True) == ABORT
    assert m.tried == [picked] and rig.metrics.retries._value.get() == 0  # type: ignore[attr-defined]
    assert rig.in_flight(picked) == 0


def test_failure_status_retries_then_the_last_answer_goes_through() -> None:
    rig = Rig("a", "b")
    m = rig.machine()
    start(rig, m)
    assert m.head(502, [], False, True, rig.clock()) == RETRY
    assert m.reported == "failure_status"
    attempt(rig, m)
    # Nobody else is left: this answer goes to the client as it is.
    assert m.head(502, [], False, True, rig.clock()) == RELAY
    assert m.ended(False, True, False, True) == POOL


def test_backpressure_with_retry_after() -> None:
    rig = Rig("a", "b")
    m = rig.machine()
    first = start(rig, m)
    assert m.head(429, [(b"Retry-After", b"5")], False, True, rig.clock()) == RETRY
    assert m.reported == "backpressure"
    assert rig.policy.loads.peek(first).backoff_until > rig.clock()  # type: ignore[union-attr]


def test_timeout_before_the_head() -> None:
    rig = Rig("a")
    m = rig.machine()
    picked = start(rig, m)
    rig.clock.advance(30)
    timeout = UpstreamTimeout("", "no response from the agent for 30s")
    assert m.attempt_failed(timeout, True, False, rig.clock()) == ANSWER  # nobody else to ask
    assert m.reported == "timeout" and m.error is timeout and timeout.agent_id == picked
    assert rig.in_flight(picked) == 0
    m.release()
    # Connect timeouts count as timeouts too.
    m = rig.machine()
    start(rig, m)
    assert m.connect_failed(UpstreamTimeout("", "connecting timed out"), True, False, rig.clock()) == ANSWER
    assert m.reported == "timeout"


def test_retries_end_with_the_last_error() -> None:
    """Every agent failed: the client gets the last attempt's error, naming that agent."""
    rig = Rig("a", "b")
    m = rig.machine()
    start(rig, m)
    assert m.attempt_failed(UpstreamError("", "reset"), True, False, rig.clock()) == RETRY
    attempt(rig, m)
    last = UpstreamError("", "reset again")
    assert m.attempt_failed(last, True, False, rig.clock()) == ANSWER
    assert m.error is last and last.agent_id == m.tried[-1]


def test_upgrade() -> None:
    rig = Rig()
    m = rig.machine()
    picked = start(rig, m)
    assert m.head(101, [(b"Upgrade", b"websocket")], True, True, rig.clock()) == UPGRADE
    assert rig.in_flight(picked) == 1  # the tunnel holds the attempt
    m.tunnel_over()
    assert rig.in_flight(picked) == 0 and rig.admitted() == 0


def test_client_gone_mid_flight() -> None:
    rig = Rig()
    m = rig.machine()
    picked = start(rig, m)
    # The client hung up: the upstream connection was closed under the attempt.
    assert m.attempt_failed(UpstreamError("", "closed"), True, True, rig.clock()) == GONE
    assert rig.in_flight(picked) == 0 and rig.metrics.attempts["reset"] == 0  # not the agent's fault
    m.release()
    assert rig.admitted() == 0


def test_client_gone_before_sending() -> None:
    rig = Rig()
    other = rig.machine()
    assert other.admit() == PROCEED
    m = rig.machine()
    picked = start(rig, m)
    assert m.abandon() == GONE  # connected, but the client had left
    assert m.choice is None and rig.in_flight(picked) == 0
    assert rig.metrics.attempts.total() == 0  # it counts as nothing
    m.release()
    m.release()  # once only
    assert rig.admitted() == 1
    other.release()
    assert rig.admitted() == 0


def test_abandon_before_departing_leaves_other_attempts_in_flight() -> None:
    rig = Rig("a")
    busy = rig.machine()
    start(rig, busy)
    m = rig.machine()
    assert m.admit() == PROCEED and m.choose() == SEND
    m.abandon()  # chosen, never sent (the card path): another request's attempt is still in flight
    assert rig.in_flight("a") == 1


def test_owner_pinned_and_gone() -> None:
    rig = Rig()
    m = rig.machine(b"POST")
    m.pinned = "b"
    assert start(rig, m) == "b"
    # The owner fails: a task's calls go to it or nowhere, never to another agent.
    assert m.attempt_failed(UpstreamError("", "reset"), True, False, rig.clock()) == ANSWER
    m.release()
    m = rig.machine(b"POST")
    m.pinned = "z"  # not registered (any more)
    assert m.admit() == PROCEED
    assert m.choose() == ANSWER
    assert isinstance(m.error, TaskOwnerUnavailable) and rig.metrics.a2a["owner_gone"] == 1
    m.release()
    assert rig.admitted() == 0


def test_owner_at_its_limit_is_overloaded_not_gone() -> None:
    """The owner is there but full: 503 overloaded (ask again), not task_owner_unavailable (it is not gone)."""
    rig = Rig(proxy=ProxySettings(max_concurrency_per_agent=1))
    busy = rig.machine(b"POST")
    busy.pinned = "b"
    assert start(rig, busy) == "b"
    m = rig.machine(b"POST")
    m.pinned = "b"
    assert m.admit() == PROCEED
    assert m.choose() == ANSWER
    assert isinstance(m.error, Overloaded) and rig.metrics.a2a["owner_gone"] == 0
    m.release()


def test_passthrough() -> None:
    rig = Rig()
    m = rig.machine(target=OUTSIDE)
    assert m.admit() == PROCEED and m.released  # no agent, no admission
    assert m.choose() == SEND and m.choice is None
    m.depart(rig.clock())
    assert m.head(200, [], False, True, rig.clock()) == RELAY
    assert m.reported == "" and not rig.metrics.attempts  # no agent outcome
    assert rig.metrics.requests[("external", "-", "ok")] == 1
    assert m.ended(False, True, False, True) == POOL
    m = rig.machine(target=OUTSIDE)
    m.choose()
    m.depart(rig.clock())
    refused = UpstreamError("", "cannot connect")
    assert m.connect_failed(refused, False, False, rig.clock()) == ANSWER  # nobody else to ask
    assert m.error is refused and refused.target == "example.com"


def test_admission_refused() -> None:
    rig = Rig(proxy=ProxySettings(max_concurrency=1))
    first = rig.machine()
    start(rig, first)
    m = rig.machine()
    assert m.admit() == ANSWER and isinstance(m.error, Overloaded)
    m.release()  # nothing was taken: the first request's slot stays
    assert rig.admitted() == 1
    first.release()
    assert rig.admitted() == 0


def test_breaker_opens_after_threshold_and_choose_skips_it() -> None:
    rig = Rig("a", "b", threshold=2)
    for _ in range(2):
        m = rig.machine(b"POST")
        m.admit()
        m.choose()
        while m.choice is not None and m.choice.agent.id != "a":
            m.abandon()
            m.choose()
        m.depart(rig.clock())
        assert m.head(500, [], False, False, rig.clock()) == RELAY  # POST, sent: not retried
        m.ended(False, True, False, True)
    assert rig.policy.breakers.state("a") == "open"
    m = rig.machine()
    assert start(rig, m) == "b"
