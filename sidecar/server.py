"""The composition root: builds every component from Settings, wires them, runs them.

Nothing else constructs the world. Components have ``async start()`` and
``async stop()``; they are started in order after the first etcd sync begins
and stopped in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .admin import AdminApi
from .cards import CardIndex
from .catalog import Catalog
from .config import Settings, changes
from .control import Control
from .discovery import WatchHub
from .dns import DnsServer
from .dynamic import ConfigStore, Starting
from .errors import RevisionCompacted
from .grpc_api import GrpcApi
from .health import agent as local_agent
from .health.outliers import OutlierDetector
from .looplag import LoopLag
from .metrics import Metrics
from .proxy.server import ProxyServer
from .registry.cards import CardSync
from .registry.etcd import EtcdClient
from .registry.lease import LeaseKeeper
from .registry.sync import CatalogSync, services_prefix
from .tracing import Tracing

log = logging.getLogger(__name__)


class Component(Protocol):
    async def start(self) -> None:
        """Bind listeners / start tasks; raise if that is impossible."""

    async def stop(self) -> None:
        """Release everything start() took; safe to call once after start()."""


class Server:
    """One sidecar: etcd sync, catalog, listeners and local agent, from one Settings."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, *, starting: Starting | None = None) -> None:
        """``settings``: flags, env, file and defaults; ``starting``: the stored document read before start."""
        self.metrics = metrics or Metrics()
        etcd_settings = settings.etcd
        self.etcd = EtcdClient.from_settings(etcd_settings)
        self.config = ConfigStore(self.etcd, settings, self.apply, self.metrics.config, starting)
        # What is in force: the base with the starting document over it (the store keeps the base apart).
        settings = self.settings = self.config.running
        self.catalog = Catalog()
        self.sync = CatalogSync(self.etcd, etcd_settings.prefix, self.catalog, self.metrics.registry)
        self.leases = LeaseKeeper(self.etcd, etcd_settings.prefix, self.metrics.registry,
                                  refresh_interval=settings.registry.refresh_interval)
        discovery = self.metrics.discovery
        self.hub = WatchHub(self.catalog, compacted=self._compacted, on_lag=discovery.lagged.inc)
        discovery.subscribers.set_function(lambda: self.hub.subscribers)
        self.control = Control(self.leases, self.etcd, self.catalog, settings.registry.default_ttl)
        # Every agent's A2A card, watched like the agents themselves.
        self.cards = CardIndex()
        self.card_sync = CardSync(self.etcd, etcd_settings.prefix, self.cards, self.metrics.health,
                                  settings.a2a.max_card_bytes)
        # Listeners and workers, started in this order after the sync task.
        self.components: list[Component] = []
        self.dns = DnsServer(settings.dns, self.catalog, self.metrics.dns, local_zone=settings.agent.zone,
                             proxy_listen=settings.proxy.listen, panic=settings.health_check.panic)
        self.components.append(self.dns)
        # Passive health: the proxy's outcomes feed outlier detection, whose ejections the proxy's picks skip.
        self.outliers = OutlierDetector(settings.health_check.outlier_detection, self.metrics.health)
        self.catalog.subscribe(self.outliers.on_snapshot)
        self.proxy = ProxyServer(
            settings, self.catalog, self.metrics.proxy, admitted=self.outliers.admitted,
            observers=[lambda outcome: self.outliers.observe(outcome.agent_id, outcome.kind.value)],
            tracing=Tracing.build(settings.tracing), cards=self.cards)
        self.components.append(self.proxy)
        self.admin = AdminApi(settings.admin, self.catalog, self.hub, self.control, self.leases, self.config,
                              self.metrics, self.readiness, cards=self.cards,
                              annotators=[lambda agent: {"breaker": self.proxy.breaker_state(agent.id)}])
        self.grpc = GrpcApi(settings.grpc, settings.admin, self.catalog, self.hub, self.control, self.metrics,
                            cards=self.cards)
        self.components.append(self.grpc)
        # Last, so that it is stopped first: the agent drains while DNS and the proxy still serve.
        self.local_agent: local_agent.LocalAgent | None = None
        if settings.agent.enabled:
            self.local_agent = local_agent.LocalAgent(settings.agent, settings.health_check, self.leases,
                                                      self.metrics.health, a2a_settings=settings.a2a)
            self.components.append(self.local_agent)
        # Who takes which live sections at run time (see apply).
        self.updates = self._updates()
        self._started: list[Component] = []
        self._listening = False
        self._member_sync: asyncio.Task[None] | None = None
        self.loop_lag = LoopLag(self.metrics.runtime.loop_lag.observe)

    async def _compacted(self, revision: int) -> bool:
        """Whether etcd no longer holds ``revision`` (a watch resumed from it would miss changes)."""
        try:
            await self.etcd.get_at(services_prefix(self.settings.etcd.prefix), revision)
        except RevisionCompacted:
            return True
        except Exception:  # etcd unreachable: what the hub holds in memory is all there is
            return False
        return False

    def apply(self, old: Settings, new: Settings) -> None:
        """Hand each component the live sections it reads, when one of them differs between ``old`` and ``new``."""
        changed = {key.split(".", 1)[0] for key, restart in changes(old, new) if not restart}
        self.settings = new
        for sections, update in self.updates:
            if sections & changed:
                update(new)

    def _updates(self) -> list[tuple[frozenset[str], Callable[[Settings], None]]]:
        # Each component's update with the live sections it reads (a test checks that every live section of
        # the schema is somebody's); each is given its sections, never another component's attributes.
        agent = self.local_agent
        updates: list[tuple[frozenset[str], Callable[[Settings], None]]] = [
            (frozenset({"load_balancer", "sticky", "proxy", "a2a", "health_check"}),
             lambda s: self.proxy.update(s.load_balancer, s.sticky, s.proxy, s.a2a, panic=s.health_check.panic)),
            (frozenset({"dns", "health_check"}), lambda s: self.dns.update(s.dns, panic=s.health_check.panic)),
            (frozenset({"health_check"}), lambda s: self.outliers.update(s.health_check.outlier_detection)),
            (frozenset({"a2a"}), lambda s: self.card_sync.update(s.a2a)),
            (frozenset({"registry"}), lambda s: self.control.update(s.registry)),
            (frozenset({"registry"}), lambda s: self.leases.update(s.registry.refresh_interval)),
            (frozenset({"admin"}), lambda s: self.admin.update(s.admin)),
            (frozenset({"admin"}), lambda s: self.grpc.update(s.admin)),
            (frozenset({"log_level"}), lambda s: logging.getLogger().setLevel(s.log_level.upper())),
        ]
        if agent is not None:
            updates.append((frozenset({"health_check", "a2a"}), lambda s: agent.update(s.health_check, s.a2a)))
        return updates

    def readiness(self) -> dict[str, Any]:
        """Ready once the first snapshot has synced and every listener is up."""
        synced = self.catalog.synced
        detail: dict[str, Any] = {
            "ready": synced and self._listening,
            "synced": synced,
            "listeners": self._listening,
            "etcd_connected": self.sync.connected,
            "revision": self.catalog.snapshot.revision,
            "agents": len(self.catalog.snapshot.agents),
        }
        if self.local_agent is not None:
            detail["local_agent"] = self.local_agent.describe()
        if self.sync.stale_since is not None and synced:
            detail["stale_since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.sync.stale_since))
            detail["stale_seconds"] = round(self.sync.stale_seconds(), 3)
        return detail

    async def start(self) -> None:
        self.loop_lag.start()
        await self.sync.start()
        await self.config.start()
        await self.card_sync.start()
        if self.settings.etcd.auto_sync_interval:
            self._member_sync = asyncio.get_running_loop().create_task(
                self.etcd.run_member_sync(self.settings.etcd.auto_sync_interval), name="etcd-member-sync")
        try:
            for component in (*self.components, self.admin):
                await component.start()
                self._started.append(component)
        except BaseException:
            await self.stop()
            raise
        self._listening = True

    async def stop(self) -> None:
        """Stop everything in reverse order; each step is bounded, so SIGTERM always ends the process."""
        self._listening = False
        # Room for the local agent's drain plus a revoke on a slow etcd.
        bound = self.settings.health_check.drain_period + 2 * self.settings.etcd.request_timeout + 5
        for component in reversed(self._started):
            await _bounded(component.stop(), f"stopping {type(component).__name__}", bound)
        self._started.clear()
        await _bounded(self.leases.close(), "revoking leases", bound)
        self.hub.close()
        if self._member_sync is not None:
            self._member_sync.cancel()
        await _bounded(self.config.stop(), "stopping the configuration watch", bound)
        await _bounded(self.card_sync.stop(), "stopping the card watch", bound)
        await _bounded(self.sync.stop(), "stopping the etcd watch", bound)
        await _bounded(self.etcd.close(), "closing the etcd client", bound)
        self.loop_lag.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Start, serve until ``stop`` is set, then shut down gracefully."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


async def _bounded(step: Awaitable[None], what: str, timeout: float) -> None:
    try:
        await asyncio.wait_for(step, timeout)
    except TimeoutError:
        log.error("%s took longer than %gs; going on without it", what, timeout)
    except Exception:
        log.exception("%s failed", what)
