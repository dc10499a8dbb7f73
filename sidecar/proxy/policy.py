"""Choosing an agent for a request: health, breakers, limits, stickiness, then the
balancer. No I/O: the relay asks, this answers with an agent and a breaker ticket
or raises the typed error the relay turns into a response.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from ..catalog import Snapshot
from ..config import LoadBalancerSettings, ProxySettings, StickySettings
from ..errors import CircuitOpen, NoHealthyAgent, Overloaded, UnknownTarget
from ..model import Agent
from ..serving import servable
from . import balancers
from .affinity import Affinity
from .breaker import Breakers, StateListener, Ticket
from .heads import Keys
from .limits import Limits
from .load import LoadTable, Outcome
from .retries import RetryBudget
from .routing import Route


@dataclass(slots=True)
class Choice:
    """The agent for one attempt, its breaker ticket, and a Set-Cookie to send (or None)."""

    agent: Agent
    ticket: Ticket
    set_cookie: str | None = None


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
        self.breakers = Breakers(balancing.circuit_breaker, clock, breaker_listener)
        self.affinity = Affinity(sticky, clock)
        self.limits = Limits(proxy, clock)
        self.budget = RetryBudget(balancing.retries, clock)
        self._balancers: dict[str, balancers.Balancer] = {}
        self._ctx = balancers.PickContext(self.rng, 0.0, self.loads)
        # route key -> (snapshot, its agents of the route): selections are redone only for a new snapshot.
        self._selections: dict[str, tuple[Snapshot, tuple[Agent, ...]]] = {}
        # health_check.panic (live), and passive health's filter (outlier ejections).
        self.panic = panic
        self.admitted = admitted

    def update(self, balancing: LoadBalancerSettings | None = None, sticky: StickySettings | None = None,
               proxy: ProxySettings | None = None, panic: bool | None = None) -> None:
        """Hot-apply new settings; breaker states, pins and load estimates are kept."""
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

    def algorithm(self, route: Route) -> str:
        """The balancer name for ``route`` (per-capability override, else the default)."""
        return self.balancing.per_capability.get(route.capability, self.balancing.algorithm)

    def _balancer(self, route: Route) -> balancers.Balancer:
        balancer = self._balancers.get(route.key)
        if balancer is None:
            zone = self.local_zone if self.balancing.zone_preference else ""
            balancer = self._balancers[route.key] = balancers.make(self.algorithm(route), zone)
        return balancer

    def choose(self, route: Route, snapshot: Snapshot, keys: Keys, exclude: Collection[str] = ()) -> Choice:
        """An agent of ``route`` for one attempt, skipping ids in ``exclude``.

        Raises UnknownTarget (no such agents), NoHealthyAgent (none healthy, or every
        healthy one already tried), CircuitOpen (every remaining one has its breaker
        open) or Overloaded (every remaining one is at its limit or asked us to back off).
        """
        agents = self.agents(route, snapshot)
        if not agents:
            raise UnknownTarget(route.host, f"no agent is registered for {route.host}")
        now = self.clock()
        loads, breakers, limits = self.loads, self.breakers, self.limits
        usable: list[Agent] = []
        healthy = circuit_open = busy = 0
        available = breakers.available
        peek = loads.peek
        idle_has_room = limits.agent_has_room(0)
        for agent in servable(agents, self.panic, self.admitted):
            agent_id = agent.id
            if exclude and agent_id in exclude:
                continue
            healthy += 1
            if not available(agent_id):
                circuit_open += 1
                continue
            load = peek(agent_id)
            if load is None or (load.in_flight == 0 and load.backoff_until <= now):
                room = idle_has_room
            else:
                room = load.backoff_until <= now and limits.agent_has_room(load.in_flight)
            if room:
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

    def has_another(self, route: Route, snapshot: Snapshot, tried: Collection[str]) -> bool:
        """Whether an agent not in ``tried`` could take a retry now (servable, breaker allows it)."""
        return any(a.id not in tried and self.breakers.available(a.id)
                   for a in servable(self.agents(route, snapshot), self.panic, self.admitted))

    def agents(self, route: Route, snapshot: Snapshot) -> tuple[Agent, ...]:
        """``route.agents(snapshot)``, remembered per route until the snapshot changes."""
        cached = self._selections.get(route.key)
        if cached is not None and cached[0] is snapshot:
            return cached[1]
        agents = route.agents(snapshot)
        if len(self._selections) >= 4096:
            self._selections.clear()
        self._selections[route.key] = (snapshot, agents)
        return agents

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
        agent = self._balancer(route).pick(usable, ctx)
        if not sticky:
            return agent, None
        affinity.pin(route.key, keys.session, agent)
        return agent, affinity.set_cookie(keys.session, keys.affinity_cookie, agent)

    def observe(self, outcome: Outcome) -> None:
        """Fold an attempt's outcome into the load estimates (and notify outcome observers)."""
        self.loads.observe(outcome, self.clock())

    def retain(self, agent_ids: Iterable[str]) -> None:
        """Forget per-agent state of agents that left the registry."""
        ids = set(agent_ids)
        self.breakers.retain(ids)
        self.loads.retain(ids)
