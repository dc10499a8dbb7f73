"""Per-agent circuit breakers; the only module that imports pybreaker.

pybreaker keeps each agent's state machine (consecutive failures -> open, after
``timeout`` half-open, ``half_open_requests`` successes -> closed, a failure ->
open again). Admission and the half-open trial count are ours: an attempt holds
a ``Ticket`` from ``admit`` and reports it with ``record`` once the response
head (or the failure) is known, so long streams do not hold a breaker call open.
The clock is injectable: pybreaker's wall-clock ``opened_at`` is derived from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Literal

import pybreaker

from ..config import CircuitBreakerSettings
from .ticket import Ticket

State = Literal["closed", "open", "half_open"]
_STATES: dict[str, State] = {
    pybreaker.STATE_CLOSED: "closed",
    pybreaker.STATE_OPEN: "open",
    pybreaker.STATE_HALF_OPEN: "half_open",
}
StateListener = Callable[[str, State], None]


class _Failed(Exception):
    pass


class _ClockStorage(pybreaker.CircuitMemoryStorage):
    """Memory storage whose ``opened_at`` follows an injectable monotonic clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self._clock = clock
        self._opened_clock: float | None = None

    @property  # type: ignore[override]
    def opened_at(self) -> datetime | None:
        if self._opened_clock is None:
            return None
        return datetime.now(UTC) - timedelta(seconds=self._clock() - self._opened_clock)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._opened_clock = self._clock()

    def opened_for(self) -> float:
        return 0.0 if self._opened_clock is None else self._clock() - self._opened_clock


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, agent_id: str, tripped: set[str], notify: StateListener | None) -> None:
        self.agent_id = agent_id
        self.tripped = tripped
        self.notify = notify

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: object, new_state: object) -> None:
        name = getattr(new_state, "name", "")
        if name == pybreaker.STATE_CLOSED:
            self.tripped.discard(self.agent_id)
        elif name in _STATES:
            self.tripped.add(self.agent_id)
        if name in _STATES and self.notify is not None:
            self.notify(self.agent_id, _STATES[name])


class _Breaker:
    __slots__ = ("cb", "storage", "trials")

    def __init__(self, cb: pybreaker.CircuitBreaker, storage: _ClockStorage) -> None:
        self.cb = cb
        self.storage = storage
        self.trials = 0


class Breakers:
    """One breaker per agent id, created on first use; settings can be swapped live."""

    def __init__(self, settings: CircuitBreakerSettings, clock: Callable[[], float] = time.monotonic,
                 listener: StateListener | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._listener = listener
        self._breakers: dict[str, _Breaker] = {}
        # Agents whose breaker is not closed (kept by the state listener): the rest need no pybreaker call.
        self._tripped: set[str] = set()

    def update(self, settings: CircuitBreakerSettings) -> None:
        """Apply new settings to every breaker (state and counts are kept)."""
        self.settings = settings
        for breaker in self._breakers.values():
            breaker.cb.fail_max = settings.failure_threshold
            breaker.cb.reset_timeout = settings.timeout
            breaker.cb.success_threshold = settings.half_open_requests

    def _get(self, agent_id: str) -> _Breaker:
        breaker = self._breakers.get(agent_id)
        if breaker is None:
            storage = _ClockStorage(self._clock)
            listeners = [_Listener(agent_id, self._tripped, self._listener)]
            cb = pybreaker.CircuitBreaker(
                fail_max=self.settings.failure_threshold, reset_timeout=self.settings.timeout,
                success_threshold=self.settings.half_open_requests, state_storage=storage,
                listeners=listeners, name=agent_id)
            breaker = self._breakers[agent_id] = _Breaker(cb, storage)
        return breaker

    @property
    def tripped(self) -> frozenset[str] | set[str]:
        """Agents whose breaker is not closed (read only; empty while breakers are disabled)."""
        return self._tripped if self.settings.enabled else frozenset()

    def state(self, agent_id: str) -> State:
        """closed, open or half_open (an agent never seen is closed)."""
        breaker = self._breakers.get(agent_id)
        return "closed" if breaker is None else _STATES[breaker.cb.current_state]

    def states(self) -> dict[str, State]:
        """The state of every agent this sidecar has a breaker for (for /v1/agents and metrics)."""
        return {agent_id: _STATES[b.cb.current_state] for agent_id, b in self._breakers.items()}

    def not_closed(self) -> tuple[int, dict[str, State]]:
        """(how many breakers there are, the state of each that is not closed): for metrics, in
        proportion to the breakers not closed, not to every breaker."""
        return len(self._breakers), {agent_id: _STATES[self._breakers[agent_id].cb.current_state]
                                     for agent_id in self._tripped if agent_id in self._breakers}

    def available(self, agent_id: str) -> bool:
        """Whether ``admit`` would let an attempt through now (no side effects)."""
        if not self.settings.enabled or agent_id not in self._tripped:
            return True
        breaker = self._breakers.get(agent_id)
        if breaker is None:
            return True
        state = breaker.cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return True
        if state == pybreaker.STATE_OPEN:
            return breaker.storage.opened_for() >= self.settings.timeout
        return breaker.trials < self.settings.half_open_requests

    def admit(self, agent_id: str) -> Ticket | None:
        """A ticket for one attempt, or None while the breaker is open or its trials are taken.

        An open breaker whose timeout has passed turns half-open here.
        """
        if not self.settings.enabled or agent_id not in self._tripped:
            return Ticket(agent_id, trial=False)
        breaker = self._get(agent_id)
        cb = breaker.cb
        state = cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return Ticket(agent_id, trial=False)
        if state == pybreaker.STATE_OPEN:
            if breaker.storage.opened_for() < self.settings.timeout:
                return None
            cb.half_open()
            breaker.trials = 0
        if breaker.trials >= self.settings.half_open_requests:
            return None
        breaker.trials += 1
        return Ticket(agent_id, trial=True)

    def record(self, ticket: Ticket, failed: bool) -> None:
        """Report how the ticket's attempt went; a second report is ignored."""
        if ticket.done:
            return
        ticket.done = True
        breaker = self._breakers.get(ticket.agent_id)
        if breaker is None:
            if not failed:
                return  # never failed: no breaker needed yet
            breaker = self._get(ticket.agent_id)
        if ticket.trial and breaker.trials > 0:
            breaker.trials -= 1
        cb = breaker.cb
        state = cb.current_state
        if not failed and state == pybreaker.STATE_CLOSED and breaker.storage.counter == 0:
            return  # the common case, and a no-op for pybreaker
        if state == pybreaker.STATE_OPEN:
            return  # already tripped by another attempt; a late report changes nothing
        if state == pybreaker.STATE_HALF_OPEN and not ticket.trial:
            return  # began before the trip; only trials decide recovery
        try:
            with cb.calling():
                if failed:
                    raise _Failed
        except (_Failed, pybreaker.CircuitBreakerError):
            pass

    def release(self, ticket: Ticket) -> None:
        """Give back a ticket whose attempt never reached the agent (counts as nothing)."""
        if ticket.done:
            return
        ticket.done = True
        breaker = self._breakers.get(ticket.agent_id)
        if ticket.trial and breaker is not None and breaker.trials > 0:
            breaker.trials -= 1

    def retain(self, agent_ids: Iterable[str]) -> None:
        """Drop the breakers of agents no longer registered."""
        keep = set(agent_ids)
        for agent_id in [a for a in self._breakers if a not in keep]:
            del self._breakers[agent_id]
            self._tripped.discard(agent_id)

    def forget(self, agent_ids: Iterable[str]) -> None:
        """Drop the breakers of these agents (they left the registry)."""
        for agent_id in agent_ids:
            if self._breakers.pop(agent_id, None) is not None:
                self._tripped.discard(agent_id)
