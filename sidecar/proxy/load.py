"""Per-agent load the balancers read (in-flight, peak-EWMA latency, Retry-After backoff)
and the outcome of every upstream attempt, which observers (breakers, passive health)
receive. Pure: time is passed in.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)


class OutcomeKind(enum.Enum):
    """How one upstream attempt ended, as far as the agent's health is concerned."""

    SUCCESS = "success"
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    RESET = "reset"  # connection closed or garbage before a complete response head
    FAILURE_STATUS = "failure_status"  # a status in circuit_breaker.failure_statuses
    BACKPRESSURE = "backpressure"  # 429, or 503 with Retry-After

    @property
    def failed(self) -> bool:
        """True for the kinds a circuit breaker counts as failures."""
        return self in _FAILED


_FAILED = frozenset((OutcomeKind.CONNECT_ERROR, OutcomeKind.TIMEOUT, OutcomeKind.RESET, OutcomeKind.FAILURE_STATUS))


@dataclass(frozen=True, slots=True)
class Outcome:
    """One finished upstream attempt: agent, kind, seconds to response head (or to failure), status."""

    agent_id: str
    kind: OutcomeKind
    latency: float
    status: int = 0
    retry_after: float = 0.0


Observer = Callable[[Outcome], None]


@dataclass(slots=True)
class AgentLoad:
    """Mutable load of one agent in this sidecar."""

    in_flight: int = 0
    rtt: float = -1.0  # peak-EWMA estimate in seconds; < 0 until the first observation
    stamp: float = 0.0
    backoff_until: float = 0.0


class LoadTable:
    """In-flight counts and peak-EWMA latency per agent id (Linkerd's estimator).

    A slower observation replaces the estimate at once (peak); faster ones pull it
    down with weight exp(-elapsed/decay); an idle estimate decays toward zero so a
    penalised agent is tried again. Backpressure counts as at least ``penalty`` s.
    """

    def __init__(self, decay: float = 10.0, default_rtt: float = 0.03, penalty: float = 1.0) -> None:
        self.decay = decay
        self.default_rtt = default_rtt
        self.penalty = penalty
        self._loads: dict[str, AgentLoad] = {}
        self._observers: list[Observer] = []

    def get(self, agent_id: str) -> AgentLoad:
        """The load record of ``agent_id`` (created empty on first use)."""
        load = self._loads.get(agent_id)
        if load is None:
            load = self._loads[agent_id] = AgentLoad()
        return load

    def peek(self, agent_id: str) -> AgentLoad | None:
        """The load record of ``agent_id`` if it has one (read only: do not change it)."""
        return self._loads.get(agent_id)

    def in_flight(self, agent_id: str) -> int:
        """Requests this sidecar has open to ``agent_id``."""
        load = self._loads.get(agent_id)
        return load.in_flight if load is not None else 0

    def rtt(self, agent_id: str, now: float) -> float:
        """The decayed peak-EWMA latency estimate of ``agent_id`` at ``now``."""
        load = self._loads.get(agent_id)
        if load is None or load.rtt < 0:
            return self.default_rtt
        return load.rtt * math.exp(-max(0.0, now - load.stamp) / self.decay)

    def backed_off(self, agent_id: str, now: float) -> bool:
        """True while a Retry-After from ``agent_id`` asks us to keep away."""
        load = self._loads.get(agent_id)
        return load is not None and load.backoff_until > now

    def start(self, agent_id: str) -> None:
        """An attempt to ``agent_id`` began."""
        self.get(agent_id).in_flight += 1

    def finish(self, agent_id: str) -> None:
        """An attempt to ``agent_id`` ended (response fully relayed or failed)."""
        load = self._loads.get(agent_id)
        if load is not None and load.in_flight > 0:
            load.in_flight -= 1

    def observe(self, outcome: Outcome, now: float) -> None:
        """Fold one attempt's outcome into the estimate and tell every observer."""
        load = self.get(outcome.agent_id)
        rtt = outcome.latency
        if outcome.kind is not OutcomeKind.SUCCESS:
            rtt = max(rtt, self.penalty)
        if outcome.retry_after > 0:
            load.backoff_until = max(load.backoff_until, now + outcome.retry_after)
        if load.rtt < 0 or rtt > load.rtt:
            load.rtt = rtt
        else:
            weight = math.exp(-max(0.0, now - load.stamp) / self.decay)
            load.rtt = load.rtt * weight + rtt * (1.0 - weight)
        load.stamp = now
        for observer in self._observers:
            try:
                observer(outcome)
            except Exception:
                log.exception("outcome observer %r failed", observer)

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(outcome)`` after every upstream attempt (passive health plugs in here)."""
        self._observers.append(observer)

    def retain(self, agent_ids: Iterable[str]) -> list[str]:
        """Forget agents no longer registered, except those with requests in flight: returned."""
        keep = set(agent_ids)
        return self.forget([a for a in self._loads if a not in keep])

    def forget(self, agent_ids: Iterable[str]) -> list[str]:
        """Forget these agents (they left the registry), except those with requests in flight: returned."""
        busy: list[str] = []
        loads = self._loads
        for agent_id in agent_ids:
            load = loads.get(agent_id)
            if load is None:
                continue
            if load.in_flight:
                busy.append(agent_id)
            else:
                del loads[agent_id]
        return busy
