"""The proxy component: binds the listener and wires catalog, policy and relay."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import typing
from collections.abc import Callable, Iterable, Sequence

from ..cards import CardIndex
from ..catalog import Catalog, Delete, Event, Reset, Snapshot
from ..config import A2aSettings, HostPort, LoadBalancerSettings, ProxySettings, Settings, StickySettings
from ..metrics import ProxyMetrics
from ..model import Agent, label
from ..tracing import Tracing
from .a2a import A2aRouting, Owners
from .breaker import State
from .load import Observer
from .policy import Policy
from .relay import Relay

log = logging.getLogger(__name__)


def _registered(snapshot: Snapshot, agent_id: str) -> bool:
    return any(a.id == agent_id for a in snapshot.by_id.get(label(agent_id), ()))


class ProxyServer:
    """``async start()`` / ``async stop()``; settings swap live with ``update``."""

    def __init__(self, settings: Settings, catalog: Catalog, metrics: ProxyMetrics, *,
                 admitted: Callable[[Agent], bool] | None = None, observers: Iterable[Observer] = (),
                 tracing: Tracing | None = None, cards: CardIndex | None = None,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        """``admitted``: a local filter on servable agents (passive health's outlier ejections);
        ``observers``: called with every upstream attempt's Outcome; ``tracing``: spans, or None."""
        self.settings = settings
        self.catalog = catalog
        self.metrics = metrics
        self.tracing = tracing
        self.policy = Policy(settings.load_balancer, settings.sticky, settings.proxy, local_zone=settings.agent.zone,
                             clock=clock, rng=rng, breaker_listener=self._breaker_changed, admitted=admitted,
                             panic=settings.health_check.panic)
        for observer in observers:
            self.policy.loads.add_observer(observer)
        a2a = settings.a2a
        # A2A routing: who holds each task and context, and the registry's cards to answer from.
        self.a2a = A2aRouting(Owners(a2a.max_tasks, a2a.max_contexts, a2a.ttl, clock), cards or CardIndex(),
                              a2a.max_body, settings.proxy.stream_idle_timeout, a2a.max_card_bytes)
        metrics.breakers = lambda: self.policy.breakers.not_closed()  # read at scrape time
        self._relay: Relay | None = None
        self._server: asyncio.Server | None = None
        self._unsubscribe: Callable[[], None] | None = None
        # The snapshot the last change produced (what the next change's events apply to), and agents that
        # left with requests in flight, whose load is forgotten at a later change.
        self._previous: Snapshot | None = None
        self._lingering: set[str] = set()
        self.address: tuple[str, int] | None = None

    def _breaker_changed(self, agent_id: str, state: State) -> None:
        self.metrics.breaker_transitions.labels(state).inc()
        log.info("circuit breaker of agent %s is %s", agent_id, state)

    def _on_snapshot(self, snapshot: Snapshot, events: Sequence[Event]) -> None:
        """Forget the per-agent state (breakers, loads) of agents that left: those the
        events removed, found in the previous snapshot, so a change costs in proportion to its events,
        not to the registry; a Reset (or the first snapshot seen) checks every agent."""
        previous, self._previous = self._previous, snapshot
        if previous is None or any(isinstance(event, Reset) for event in events):
            live = set(snapshot.agents[k].id for k in snapshot.agents)
            self._lingering = set(self.policy.retain(live))
            return
        gone = set(self._lingering)
        for event in events:
            if isinstance(event, Reset):
                continue
            old = previous.agents.get(event.key)
            if old is not None and (isinstance(event, Delete) or old.id != event.agent.id):
                gone.add(old.id)
        gone = {agent_id for agent_id in gone if not _registered(snapshot, agent_id)}
        if gone:
            self._lingering = set(self.policy.forget(gone))
        else:
            self._lingering = set()

    async def start(self) -> None:
        """Listen on ``proxy.listen``."""
        loop = asyncio.get_running_loop()
        relay = self._relay = Relay(self.settings.proxy, self.settings.dns.domain, self.catalog, self.policy,
                                    self.metrics, loop, self.tracing, self.a2a)
        host, port = HostPort.parse(self.settings.proxy.listen, "proxy.listen")
        # ClientConnection is an asyncio protocol by its methods, not its base class (see there).
        factory = typing.cast("Callable[[], asyncio.BaseProtocol]", relay.protocol)
        self._server = await loop.create_server(factory, host, port, reuse_address=True, backlog=1024)
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        self._previous = None  # the first change seen checks every agent
        self._unsubscribe = self.catalog.subscribe(self._on_snapshot)
        log.info("proxy listening on %s:%d", *self.address)

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._server is not None:
            self._server.close()
            if self._relay is not None:
                self._relay.close()
            await self._server.wait_closed()
            self._server = None
        if self.tracing is not None:
            # Export the spans still queued (bounded by tracing.export_timeout) without blocking the loop.
            await asyncio.to_thread(self.tracing.shutdown)

    def update(self, load_balancer: LoadBalancerSettings, sticky: StickySettings, proxy: ProxySettings,
               a2a: A2aSettings, *, panic: bool) -> None:
        """Hot-apply the balancer, breaker, retry, sticky, proxy (not the listener) and A2A sections, and
        ``health_check.panic``; breaker states, pins, load estimates and learnt task owners are kept."""
        self.settings = dataclasses.replace(self.settings, load_balancer=load_balancer, sticky=sticky, proxy=proxy,
                                            a2a=a2a)
        self.policy.update(load_balancer, sticky, proxy, panic=panic)
        self.a2a.update(a2a, proxy.stream_idle_timeout)
        if self._relay is not None:
            self._relay.update(proxy)

    def breaker_state(self, agent_id: str) -> State:
        """closed, open or half_open: for ``/v1/agents``."""
        return self.policy.breakers.state(agent_id)

    def breaker_states(self) -> dict[str, State]:
        """Every agent this sidecar holds a breaker for, with its state."""
        return self.policy.breakers.states()
