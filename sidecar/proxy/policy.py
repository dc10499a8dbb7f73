"""Choosing an agent for a request: health, breakers, limits, stickiness, then the
balancer; and taking in how each attempt went. No I/O: the relay asks, this answers
with an agent and a breaker ticket or raises the typed error the relay turns into a
response.

The relay asks through a few methods only: ``admit``/``done`` (a request to a
target), ``choose`` (an agent for an attempt), ``started``/``report``/``finish``
(an attempt), ``has_another``/``spend_retry`` (a retry), ``classify`` (a
response head), ``fold`` (batched outcomes).

What can be decided per snapshot is: each route gets a ``Table`` built once per
snapshot and policy version (a breaker changing state, a failure folded in,
new settings), with its servable agents, the balancer's candidates (zone
preference and weight-0 drain applied) and their ``Set-Cookie`` values. While
every servable agent of a route has a closed breaker and passes the local
filter, a request costs a table lookup, a balancer step and a load check; any
other case takes the full path (``_choose``), which decides per request.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from urllib.parse import unquote

from ..catalog import Snapshot
from ..config import LoadBalancerSettings, ProxySettings, StickySettings
from ..errors import CircuitOpen, NoHealthyAgent, Overloaded, UnknownTarget
from ..model import Agent
from ..serving import servable
from . import balancers
from .affinity import Affinity
from .breaker import Breakers, State, StateListener
from .heads import KeyNames, Keys
from .limits import Limits
from .load import LoadTable, Outcome, OutcomeKind
from .retries import RetryBudget
from .routing import Route
from .ticket import Ticket

# A table that needed the full path is rebuilt after this long (ejections end with time).
SLOW_TABLE_TTL = 0.25
_SUCCESS = OutcomeKind.SUCCESS


class Choice:
    """The agent for one attempt, its breaker ticket, and a Set-Cookie to send (or None)."""

    # A plain class, not a dataclass: mypyc gives a dataclass the generated Python __init__ (a Python
    # call per request); this one is native.
    __slots__ = ("agent", "set_cookie", "ticket")

    def __init__(self, agent: Agent, ticket: Ticket, set_cookie: str | None = None) -> None:
        self.agent = agent
        self.ticket = ticket
        self.set_cookie = set_cookie


class Table:
    """One route under one snapshot and policy version: what a request would otherwise decide."""

    __slots__ = ("agents", "balancer", "by_id", "candidates", "cookies", "expires", "fast", "snapshot", "version")

    def __init__(self, snapshot: Snapshot, version: int, agents: tuple[Agent, ...]) -> None:
        self.snapshot = snapshot
        self.version = version
        self.agents = agents  # every agent of the route, servable or not
        self.fast = False  # every servable agent has a closed breaker and passes the local filter
        self.candidates: Sequence[Agent] = ()  # what the balancer chooses among (zone, drain applied)
        self.by_id: dict[str, Agent] = {}  # servable agents by id (cookie pins)
        self.cookies: dict[str, str] = {}  # agent id -> Set-Cookie for a client without the right cookie
        self.balancer: balancers.Balancer | None = None  # the route's bare balancer
        self.expires = 0.0


class Policy:
    """Every per-target and per-agent decision of the proxy, with settings that swap live."""

    def __init__(self, balancing: LoadBalancerSettings, sticky: StickySettings, proxy: ProxySettings,
                 local_zone: str = "", clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, breaker_listener: StateListener | None = None,
                 admitted: Callable[[Agent], bool] | None = None, panic: bool = False) -> None:
        self.balancing = balancing
        self.local_zone = local_zone
        self.clock = clock
        self.rng = rng or random.Random()
        self.loads = LoadTable()
        self._listener = breaker_listener
        self.breakers = Breakers(balancing.circuit_breaker, clock, self._breaker_changed)
        self.affinity = Affinity(sticky, clock)
        self.limits = Limits(proxy, clock)
        self.budget = RetryBudget(balancing.retries, clock)
        # route key -> (balancer with zone preference and drain, the same balancer bare).
        self._balancers: dict[str, tuple[balancers.Balancer, balancers.Balancer]] = {}
        self._ctx = balancers.PickContext(self.rng, 0.0, self.loads)
        # health_check.panic (live), and passive health's filter (outlier ejections).
        self.panic = panic
        self.admitted = admitted
        self._tables: dict[str, Table] = {}
        self._version = 0
        # Successful attempts not yet folded in: agent id -> (count, slowest latency).
        self._pending: dict[str, tuple[int, float]] = {}
        self._requests = 0  # admitted requests not yet counted into the retry budget
        # The request headers and cookies that name a session or a hash key.
        self.key_names = KeyNames(sticky, balancing)
        self._failure_statuses = frozenset(balancing.circuit_breaker.failure_statuses)

    # -- settings and tables

    def update(self, balancing: LoadBalancerSettings | None = None, sticky: StickySettings | None = None,
               proxy: ProxySettings | None = None, panic: bool | None = None) -> None:
        """Hot-apply new settings; breaker states, pins and load estimates are kept."""
        self.fold()
        if panic is not None:
            self.panic = panic
        if balancing is not None:
            self.balancing = balancing
            self._balancers.clear()
            self.breakers.update(balancing.circuit_breaker)
            self.budget.update(balancing.retries)
        if sticky is not None:
            self.affinity.update(sticky)
        if proxy is not None:
            self.limits.update(proxy)
        self.key_names = KeyNames(self.affinity.settings, self.balancing)
        self._failure_statuses = frozenset(self.balancing.circuit_breaker.failure_statuses)
        self._changed()

    def _changed(self) -> None:
        self._version += 1

    def _breaker_changed(self, agent_id: str, state: State) -> None:
        self._changed()
        if self._listener is not None:
            self._listener(agent_id, state)

    def algorithm(self, route: Route) -> str:
        """The balancer name for ``route`` (per-capability override, else the default)."""
        return self.balancing.per_capability.get(route.capability, self.balancing.algorithm)

    def _balancer(self, route: Route) -> tuple[balancers.Balancer, balancers.Balancer]:
        pair = self._balancers.get(route.key)
        if pair is None:
            bare = balancers.make_bare(self.algorithm(route))
            wrapped: balancers.Balancer = balancers.SkippingDrained(bare)
            if self.balancing.zone_preference:
                wrapped = balancers.ZonePreferring(wrapped, self.local_zone)
            pair = self._balancers[route.key] = (wrapped, bare)
        return pair

    def table(self, route: Route, snapshot: Snapshot) -> Table:
        """The route's Table for ``snapshot`` at the current policy version (built when missing)."""
        table = self._tables.get(route.key)
        if table is not None and table.snapshot is snapshot and table.version == self._version and (
                table.fast or table.expires > self.clock()):
            return table
        return self._build(route, snapshot)

    def _build(self, route: Route, snapshot: Snapshot) -> Table:
        table = Table(snapshot, self._version, route.agents(snapshot))
        plain = servable(table.agents, self.panic)
        admitted = self.admitted
        tripped = self.breakers.tripped
        table.fast = bool(plain) and not any(a.id in tripped for a in plain) and (
            admitted is None or all(admitted(a) for a in plain))
        if table.fast:
            zone = self.local_zone if self.balancing.zone_preference else ""
            table.candidates = balancers.narrow(plain, zone)
            table.by_id = {a.id: a for a in plain}
            table.balancer = self._balancer(route)[1]
            if self.affinity.settings.enabled:
                table.cookies = {a.id: self.affinity.set_cookie(None, None, a) or "" for a in plain}
        else:
            table.expires = self.clock() + SLOW_TABLE_TTL
        if len(self._tables) >= 4096:
            self._tables.clear()
        self._tables[route.key] = table
        return table

    def agents(self, route: Route, snapshot: Snapshot) -> tuple[Agent, ...]:
        """Every agent of ``route`` in ``snapshot`` (from its table)."""
        return self.table(route, snapshot).agents

    # -- a request to a target

    def admit(self, route: Route) -> None:
        """Count a request to ``route``'s target in (and for the retry budget); raises Overloaded."""
        self.limits.acquire(route.key)
        self._requests += 1  # into the retry budget at the next fold

    def done(self, route: Route) -> None:
        """Count a request admitted to ``route``'s target out."""
        self.limits.release(route.key)

    # -- an agent for an attempt

    def choose(self, route: Route, snapshot: Snapshot, keys: Keys, exclude: Collection[str] = ()) -> Choice:
        """An agent of ``route`` for one attempt, skipping ids in ``exclude``.

        Raises UnknownTarget (no such agents), NoHealthyAgent (none healthy, or every
        healthy one already tried), CircuitOpen (every remaining one has its breaker
        open) or Overloaded (every remaining one is at its limit or asked us to back off).
        """
        table = self.table(route, snapshot)
        if table.fast and not exclude and not keys.session:
            sticky = self.affinity.settings.enabled
            agent = None
            if keys.affinity_cookie and sticky:
                agent = table.by_id.get(unquote(keys.affinity_cookie))
            set_cookie = None
            if agent is None:
                ctx = self._ctx
                ctx.now = self.clock()
                ctx.key = keys.hash_key
                assert table.balancer is not None
                agent = table.balancer.pick(table.candidates, ctx)
                if sticky:
                    set_cookie = table.cookies[agent.id]
            load = self.loads.peek(agent.id)
            if load is None or (load.in_flight < self.limits.settings.max_concurrency_per_agent and (
                    not load.backoff_until or load.backoff_until <= self.clock())):
                return Choice(agent, Ticket(agent.id, False), set_cookie)
        return self._choose(route, table.agents, keys, exclude)

    def _choose(self, route: Route, agents: tuple[Agent, ...], keys: Keys, exclude: Collection[str]) -> Choice:
        if not agents:
            raise UnknownTarget(route.host, f"no agent is registered for {route.host}")
        now = self.clock()
        loads, breakers, limits = self.loads, self.breakers, self.limits
        usable: list[Agent] = []
        healthy = circuit_open = busy = 0
        for agent in servable(agents, self.panic, self.admitted):
            agent_id = agent.id
            if exclude and agent_id in exclude:
                continue
            healthy += 1
            if not breakers.available(agent_id):
                circuit_open += 1
                continue
            load = loads.peek(agent_id)
            if load is None or (load.backoff_until <= now and limits.agent_has_room(load.in_flight)):
                usable.append(agent)
            else:
                busy += 1
        while usable:
            agent, set_cookie = self._pick(route, usable, keys, now)
            ticket = breakers.admit(agent.id)
            if ticket is not None:
                return Choice(agent, ticket, set_cookie)
            usable.remove(agent)  # its half-open trials are taken
            circuit_open += 1
        if not healthy:
            raise NoHealthyAgent(route.host, f"no healthy agent for {route.host}")
        if busy:
            raise Overloaded(route.host, f"every agent of {route.host} is at its concurrency limit or backing off")
        raise CircuitOpen(route.host, f"the circuit breaker of every healthy agent of {route.host} is open")

    def _pick(self, route: Route, usable: list[Agent], keys: Keys, now: float) -> tuple[Agent, str | None]:
        affinity = self.affinity
        sticky = affinity.settings.enabled
        if sticky and (keys.session or keys.affinity_cookie):
            closed = [a for a in usable if self.breakers.state(a.id) == "closed"]
            pinned = affinity.find(route.key, keys.session, keys.affinity_cookie, closed)
            if pinned is not None:
                return pinned, affinity.set_cookie(keys.session, keys.affinity_cookie, pinned)
        ctx = self._ctx  # one context, refilled per pick: balancers keep nothing of it
        ctx.rng = self.rng
        ctx.now = now
        ctx.key = keys.hash_key
        agent = self._balancer(route)[0].pick(usable, ctx)
        if not sticky:
            return agent, None
        affinity.pin(route.key, keys.session, agent)
        return agent, affinity.set_cookie(keys.session, keys.affinity_cookie, agent)

    def has_another(self, route: Route, snapshot: Snapshot, tried: Collection[str]) -> bool:
        """Whether an agent not in ``tried`` could take a retry now (servable, breaker allows it)."""
        return any(a.id not in tried and self.breakers.available(a.id)
                   for a in servable(self.agents(route, snapshot), self.panic, self.admitted))

    def spend_retry(self) -> bool:
        """Take one retry from the retry budget; False when it is exhausted."""
        self._fold_requests()
        return self.budget.try_retry()

    def _fold_requests(self) -> None:
        if self._requests:
            self.budget.request(self._requests)
            self._requests = 0

    @property
    def retry_attempts(self) -> int:
        """How many extra attempts a request may make (``load_balancer.retries.attempts``)."""
        return self.balancing.retries.attempts

    # -- how attempts go

    def classify(self, status: int, retry_after: float) -> OutcomeKind:
        """The outcome kind of a response head: a failure status, backpressure (429, 503 with Retry-After)
        or success."""
        if status in self._failure_statuses:
            return OutcomeKind.FAILURE_STATUS
        if status == 429 or retry_after:
            return OutcomeKind.BACKPRESSURE
        return _SUCCESS

    def started(self, choice: Choice) -> None:
        """An attempt to the chosen agent began (it counts as in flight)."""
        self.loads.start(choice.agent.id)

    def finish(self, choice: Choice) -> None:
        """The attempt ended: its response was relayed, or it failed."""
        self.loads.finish(choice.agent.id)

    def release(self, choice: Choice) -> None:
        """The attempt never reached the agent: its breaker ticket counts as nothing."""
        self.breakers.release(choice.ticket)

    def report(self, choice: Choice, kind: OutcomeKind, latency: float, status: int = 0,
               retry_after: float = 0.0) -> bool:
        """How the attempt went, at its response head or failure. True when it opened a batch:
        the caller then arranges a ``fold`` soon (the end of this event-loop turn).

        Successes of closed breakers are counted and folded in batches (one breaker reset,
        one load observation with the batch's slowest latency, one Outcome to observers per
        agent); anything else is taken in at once, after the agent's pending successes, so
        a breaker still opens after exactly ``failure_threshold`` consecutive failures.
        """
        agent_id = choice.agent.id
        ticket = choice.ticket
        if kind is _SUCCESS and not ticket.trial:
            ticket.done = True
            pending = self._pending
            entry = pending.get(agent_id)
            if entry is None:
                pending[agent_id] = (1, latency)
                return len(pending) == 1
            pending[agent_id] = (entry[0] + 1, max(entry[1], latency))
            return False
        if agent_id in self._pending:
            self._fold_one(agent_id, self._pending.pop(agent_id)[1], self.clock())
        self.breakers.record(ticket, kind.failed)
        self.loads.observe(Outcome(agent_id, kind, latency, status, retry_after), self.clock())
        if kind is not _SUCCESS:
            self._changed()  # an observer may have ejected the agent
        return False

    def fold(self) -> None:
        """Take in the successes and requests counted since the last fold."""
        self._fold_requests()
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        now = self.clock()
        for agent_id, (_, slowest) in pending.items():
            self._fold_one(agent_id, slowest, now)

    def _fold_one(self, agent_id: str, slowest: float, now: float) -> None:
        self.breakers.record(Ticket(agent_id, False), False)
        self.loads.observe(Outcome(agent_id, _SUCCESS, slowest), now)

    def retain(self, agent_ids: Iterable[str]) -> list[str]:
        """Forget per-agent state of agents that left the registry; the ids whose load is kept because
        requests to them are still in flight."""
        ids = set(agent_ids)
        self.fold()
        self.breakers.retain(ids)
        return self.loads.retain(ids)

    def forget(self, agent_ids: Collection[str]) -> list[str]:
        """Forget per-agent state of these agents, which left the registry (``retain`` for a few); the
        ids whose load is kept because requests to them are still in flight."""
        self.fold()
        self.breakers.forget(agent_ids)
        return self.loads.forget(agent_ids)
