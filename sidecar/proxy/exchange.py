"""The exchange state machine: one request forwarded to agents (or a passthrough host),
across its attempts, with no I/O (events in, actions out, as h11 and hypercorn do).

Its methods are the events of a request (admitted, agent chosen, attempt started,
connect failed, response head arrived, attempt failed, response ended, client gone,
tunnel over); each returns the action its driver must take (an int below) and never
touches a socket, a future or the event loop: time comes in as ``now``, the policy
(pure) is asked and told, metrics are plain counters. What an action carries is an
attribute: ``choice`` (SEND), ``error`` (ANSWER), ``keep`` (whether the client
connection may serve another request), ``fold`` (a success batch was opened: the
driver arranges ``Policy.fold`` at the end of the loop turn), ``reported`` (the
outcome kind just accounted, for the trace).

Two drivers execute the actions: ``Flight`` (flight.py) from the upstream socket's
callbacks, and ``Relay.fly`` (relay.py), the connection task's loop for whatever has
to wait (a new connection, a retry, a tunnel). One copy of each rule lives here:
admission release, choosing (and the A2A owner pin), outcome and breaker reporting,
the retry decision, pool or close.
"""

from __future__ import annotations

from bisect import bisect_left

from ..catalog import Catalog
from ..errors import NoHealthyAgent, Overloaded, ProxyError, TaskOwnerUnavailable, UpstreamError, UpstreamTimeout
from ..metrics import ProxyMetrics
from .heads import Keys, retry_after
from .load import OutcomeKind
from .policy import Choice, Policy
from .retries import safe_to_retry
from .routing import Route

# Actions.
PROCEED = 0  # nothing to do: go on
SEND = 1  # send the request to ``choice`` (None: the passthrough host)
RELAY = 2  # relay the response head (and the body after it) to the client
RETRY = 3  # drop this attempt (close its connection) and choose again
UPGRADE = 4  # relay the 101 and turn both connections into a tunnel
ANSWER = 5  # answer ``error`` to the client
GONE = 6  # the client has gone: give back what is held, answer nobody
POOL = 7  # the response ended cleanly: pool the upstream connection
CLOSE = 8  # the response ended: close the upstream connection (the client may stay)
ABORT = 9  # the response was cut short: close the upstream connection, abort the client
DONE = 10  # the request is over (for the driver's last step; ``keep`` tells about the client)

_SUCCESS = OutcomeKind.SUCCESS
_TIMEOUT = OutcomeKind.TIMEOUT
_RESET = OutcomeKind.RESET
_CONNECT_ERROR = OutcomeKind.CONNECT_ERROR


class Machine:
    """One request across its attempts: what happened so far, and what to do next."""

    __slots__ = ("attempt_started", "catalog", "choice", "departed", "error", "fold", "keep", "keys", "last_agent",
                 "last_error", "method", "metrics", "passthrough", "pinned", "policy", "released", "reported",
                 "route", "started", "tried")

    def __init__(self, policy: Policy, metrics: ProxyMetrics, catalog: Catalog, route: Route, keys: Keys,
                 method: bytes, started: float) -> None:
        self.policy = policy
        self.metrics = metrics
        self.catalog = catalog
        self.route = route
        self.keys = keys
        self.method = method
        self.started = started
        self.passthrough = route.kind == "external"
        self.tried: list[str] = []
        self.choice: Choice | None = None
        self.departed = False  # the attempt on ``choice`` has started (it is in flight)
        self.attempt_started = started
        self.error: ProxyError | None = None  # what ANSWER answers
        self.last_error: ProxyError | None = None  # the last attempt's failure, answered when nobody is left
        self.last_agent = ""
        self.keep = True  # the client connection may serve another request after this one
        self.released = self.passthrough  # the target's concurrency slot is given back (passthrough: none taken)
        self.pinned: str | None = None  # the agent holding an A2A call's task or context: it or nobody
        self.fold = False  # a success batch was opened: the driver arranges ``Policy.fold`` soon
        self.reported = ""  # the outcome kind of the attempt just accounted ("" when none)

    # -- the request

    def admit(self) -> int:
        """The request is ready: count it in at its target. PROCEED, or ANSWER (Overloaded)."""
        if self.passthrough:
            return PROCEED
        try:
            self.policy.admit(self.route)
        except ProxyError as err:
            self.released = True
            self.error = err
            return ANSWER
        return PROCEED

    def release(self) -> None:
        """Give the target's concurrency slot back (once; the request is over or starts over)."""
        if not self.released:
            self.released = True
            self.policy.done(self.route)

    # -- one attempt

    def choose(self) -> int:
        """An agent for the next attempt: SEND (``choice``; None for passthrough), or ANSWER."""
        self.departed = False
        if self.passthrough:
            self.choice = None
            return SEND
        route = self.route
        if self.pinned is not None:
            return self._owner(self.pinned)
        try:
            self.choice = self.policy.choose(route, self.catalog.snapshot, self.keys, self.tried)
        except ProxyError as err:
            self.choice = None
            last = self.last_error
            if last is not None:  # nobody else to ask: the last attempt's failure goes to the client
                last.agent_id = self.last_agent
            self.error = last if last is not None else err
            return ANSWER
        return SEND

    def _owner(self, agent_id: str) -> int:
        """The agent holding the task or context, or TaskOwnerUnavailable (never another agent)."""
        route = self.route
        policy = self.policy
        snapshot = self.catalog.snapshot
        agents = policy.agents(route, snapshot)
        others = [a.id for a in agents if a.id != agent_id]
        try:
            if agent_id in self.tried or len(others) == len(agents):
                raise NoHealthyAgent(route.host, "gone")
            self.choice = policy.choose(route, snapshot, self.keys, others)
        except Overloaded as exc:  # the owner is there, at its limit: the client may ask again (503/429)
            self.choice = None
            self.error = exc
            return ANSWER
        except ProxyError as exc:
            self.choice = None
            self.metrics.a2a["owner_gone"] += 1
            self.error = TaskOwnerUnavailable(route.host, f"agent {agent_id}, which holds this task or context, "
                                                          f"cannot take it ({exc}); no other agent knows it")
            return ANSWER
        return SEND

    def depart(self, now: float) -> None:
        """The attempt on ``choice`` starts (it counts as in flight from now)."""
        self.attempt_started = now
        choice = self.choice
        if choice is not None:
            self.departed = True
            self.tried.append(choice.agent.id)
            self.policy.started(choice)

    def abandon(self) -> int:
        """The attempt never reached its agent (the client left, or the driver was cancelled): it counts as
        nothing. GONE."""
        choice = self.choice
        if choice is not None:
            self.choice = None
            if self.departed:
                self.policy.finish(choice)
            self.policy.release(choice)
        return GONE

    def connect_failed(self, error: ProxyError, timed_out: bool, client_closed: bool, now: float) -> int:
        """Connecting failed (nothing was sent): RETRY, ANSWER or GONE."""
        return self._failed(_TIMEOUT if timed_out else _CONNECT_ERROR, error, False, True, client_closed, now)

    def attempt_failed(self, error: ProxyError, replayable: bool, client_closed: bool, now: float) -> int:
        """The attempt failed after sending, before a response head (reset, timeout, garbage): RETRY, ANSWER
        or GONE."""
        return self._failed(_TIMEOUT if isinstance(error, UpstreamTimeout) else _RESET, error, True, replayable,
                            client_closed, now)

    def _failed(self, kind: OutcomeKind, error: ProxyError, sent: bool, replayable: bool, client_closed: bool,
                now: float) -> int:
        error.target = self.route.host
        choice = self.choice
        if choice is None:  # passthrough: no agent to account, nobody else to ask
            self.error = error
            return ANSWER
        self.choice = None
        self.policy.finish(choice)
        if client_closed:
            self.policy.release(choice)
            return GONE
        agent_id = choice.agent.id
        self.last_error, self.last_agent = error, agent_id
        if self._account(choice, kind, 0, 0.0, sent, replayable, now):
            return RETRY
        error.agent_id = agent_id
        self.error = error
        return ANSWER

    def head(self, status: int, headers: list[tuple[bytes, bytes]], upgraded: bool, replayable: bool,
             now: float) -> int:
        """The response head arrived: RELAY, UPGRADE, or RETRY (the answer is dropped for another agent's)."""
        choice = self.choice
        if choice is not None:
            backoff = retry_after(headers) if status == 429 or status == 503 else 0.0
            kind = self.policy.classify(status, backoff)
            if self._account(choice, kind, status, backoff, True, replayable, now):
                self.choice = None
                self.policy.finish(choice)
                self.last_error = UpstreamError(self.route.host, f"the agent answered {status}")
                self.last_agent = choice.agent.id
                return RETRY
        metrics = self.metrics
        route = self.route
        # ``metrics.observe_duration`` without its Python calls (this module is compiled): one dict
        # lookup for the capability's stats (``of_capability`` only the first time, or past the limit).
        stats = metrics.capabilities.get(route.capability)
        if stats is None:
            stats = metrics.of_capability(route.capability)
        elapsed = now - self.started
        durations = stats.durations
        durations.counts[bisect_left(durations.bounds, elapsed)] += 1
        durations.sum += elapsed
        metrics.requests[(route.kind, stats.capability, "ok")] += 1
        return UPGRADE if upgraded else RELAY

    def _account(self, choice: Choice, kind: OutcomeKind, status: int, backoff: float, sent: bool,
                 replayable: bool, now: float) -> bool:
        """Report an attempt's outcome to the policy and the metrics; whether to retry elsewhere."""
        policy = self.policy
        if policy.report(choice, kind, now - self.attempt_started, status, backoff):
            self.fold = True  # successes are folded in once per event-loop turn
        value = kind._value_  # an Enum's __hash__ is Python code; its value's is not
        self.metrics.attempts[value] += 1
        self.reported = value
        return kind is not _SUCCESS and self._may_retry(sent, replayable)

    def _may_retry(self, sent: bool, replayable: bool) -> bool:
        """Whether a failed attempt may go to another agent: one is left, it is safe, the budget allows it."""
        policy = self.policy
        if len(self.tried) > policy.retry_attempts or self.pinned is not None:
            return False  # a task's calls go to its owner or nowhere
        if not safe_to_retry(self.method, sent, replayable):
            return False
        if not policy.has_another(self.route, self.catalog.snapshot, self.tried):
            return False
        if not policy.spend_retry():
            self.metrics.retry_budget_exhausted.inc()
            return False
        self.metrics.retries.inc()
        return True

    # -- the end

    def ended(self, failed: bool, upstream_keep_alive: bool, no_body: bool, body_done: bool) -> int:
        """The response ended, complete or cut short (``failed``): POOL, CLOSE or ABORT (then DONE)."""
        self.tunnel_over()  # the same accounting: the attempt is over, the slot given back
        if failed:
            self.keep = False
            return ABORT
        if upstream_keep_alive and not no_body and body_done:
            return POOL
        return CLOSE

    def tunnel_over(self) -> None:
        """An upgraded exchange's tunnel ended (and the last step of ``ended``): finish the attempt, release."""
        choice = self.choice
        if choice is not None:
            self.policy.finish(choice)
        self.release()
