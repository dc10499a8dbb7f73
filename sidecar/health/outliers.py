"""Passive health: outlier detection on the proxy's per-attempt outcomes (Envoy's
consecutive-failure detector, local to this sidecar).

After ``consecutive_failures`` failed attempts in a row (connect error, timeout,
reset, a failure status) an agent is ejected from this proxy's picks for
``base_ejection_time x ejections``, capped at ``max_ejection_time``, unless that
would leave more than ``max_ejection_share`` of one of its capabilities ejected.
It comes back when its time is up or when its own sidecar publishes a passing
check (its status turns healthy again). Pure: the clock is passed in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..catalog import Delete, Event, Reset, Snapshot, Upsert
from ..config import OutlierSettings
from ..metrics import HealthMetrics
from ..model import HEALTHY, Agent

# Outcome kinds (``proxy.load.OutcomeKind`` values) that count as failures of the agent.
FAILURES = frozenset(("connect_error", "timeout", "reset", "failure_status"))
SUCCESS = "success"


@dataclass(slots=True)
class _Record:
    failures: int = 0
    ejections: int = 0
    until: float = 0.0  # ejected while now < until
    since: float = 0.0  # when the last ejection ended (for forgetting old ejections)


class OutlierDetector:
    """Ejects agents that keep failing; ``admitted(agent)`` is the proxy's filter."""

    def __init__(self, settings: OutlierSettings, metrics: HealthMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._metrics = metrics
        self._clock = clock
        self._records: dict[str, _Record] = {}
        self._capabilities: dict[str, tuple[str, ...]] = {}  # agent id -> capability labels
        self._members: dict[str, int] = {}  # capability label -> number of agents
        self._status: dict[str, str] = {}  # agent id -> last published status

    def update(self, settings: OutlierSettings) -> None:
        """Hot-apply new settings; current ejections keep their end time."""
        self.settings = settings

    def observe(self, agent_id: str, kind: str) -> None:
        """One finished attempt to ``agent_id`` whose outcome kind is ``kind`` (an OutcomeKind value)."""
        if not self.settings.enabled:
            return
        if kind == SUCCESS:
            record = self._records.get(agent_id)
            if record is not None:
                record.failures = 0
            return
        if kind not in FAILURES:
            return
        record = self._records.setdefault(agent_id, _Record())
        record.failures += 1
        now = self._clock()
        if record.failures >= self.settings.consecutive_failures and record.until <= now:
            self._eject(agent_id, record, now)

    def _eject(self, agent_id: str, record: _Record, now: float) -> None:
        share = self.settings.max_ejection_share
        for capability in self._capabilities.get(agent_id, ()):
            allowed = math.floor(share * self._members.get(capability, 0) + 1e-9)
            if self._ejected_in(capability, now) + 1 > allowed:
                self._metrics.ejections_refused.inc()
                record.failures = 0
                return
        if record.since and now - record.since > self.settings.max_ejection_time:
            record.ejections = 0  # a good while since its last ejection: start over
        record.ejections += 1
        record.failures = 0
        duration = min(self.settings.base_ejection_time * record.ejections, self.settings.max_ejection_time)
        record.until = now + duration
        record.since = record.until
        self._metrics.ejections.inc()
        self._metrics.ejected_agents.set(self.ejected_count(now))

    def _ejected_in(self, capability: str, now: float) -> int:
        return sum(1 for agent_id, r in self._records.items()
                   if r.until > now and capability in self._capabilities.get(agent_id, ()))

    def ejected(self, agent_id: str) -> bool:
        """Whether ``agent_id`` is ejected now."""
        record = self._records.get(agent_id)
        return record is not None and record.until > self._clock()

    def admitted(self, agent: Agent) -> bool:
        """The proxy's filter: False while ``agent`` is ejected."""
        record = self._records.get(agent.id)
        return record is None or record.until <= self._clock()

    def ejected_count(self, now: float | None = None) -> int:
        """How many agents are ejected now."""
        at = self._clock() if now is None else now
        return sum(1 for r in self._records.values() if r.until > at)

    def on_snapshot(self, snapshot: Snapshot, events: Sequence[Event]) -> None:
        """Catalog subscriber: learn each agent's capabilities; a status turning healthy ends an ejection."""
        if any(isinstance(e, (Reset, Delete)) for e in events) or len(events) > 64:
            self._reindex(snapshot)
            return
        for event in events:
            if isinstance(event, Upsert):
                self._learn(event.agent)
        self._members = {cap: len(agents) for cap, agents in snapshot.by_capability.items()}

    def _learn(self, agent: Agent) -> None:
        self._capabilities[agent.id] = agent.capability_labels
        previous = self._status.get(agent.id)
        self._status[agent.id] = agent.health.status
        record = self._records.get(agent.id)
        if record is not None and agent.health.status == HEALTHY and previous not in (None, HEALTHY):
            record.until = 0.0  # its own sidecar saw it pass its checks again
            record.failures = 0
            self._metrics.ejected_agents.set(self.ejected_count())

    def _reindex(self, snapshot: Snapshot) -> None:
        live = {agent.id: agent for agent in snapshot.agents.values()}
        for agent_id in [a for a in self._records if a not in live]:
            del self._records[agent_id]
        self._capabilities = {}
        self._status = {k: v for k, v in self._status.items() if k in live}
        for agent in live.values():
            self._learn(agent)
        self._members = {cap: len(agents) for cap, agents in snapshot.by_capability.items()}
        self._metrics.ejected_agents.set(self.ejected_count())
