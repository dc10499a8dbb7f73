"""The composition root: builds every component from Settings, wires them, runs them.

Nothing else constructs the world. Components have ``async start()`` and
``async stop()``; they are started in order after the first etcd sync begins
and stopped in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from .admin import AdminApi
from .catalog import Catalog
from .config import Settings
from .dns import DnsServer
from .health import agent as local_agent
from .health.outliers import OutlierDetector
from .metrics import Metrics
from .proxy.server import ProxyServer
from .registry.etcd import EtcdClient
from .registry.lease import LeaseKeeper
from .registry.sync import CatalogSync
from .tracing import Tracing

log = logging.getLogger(__name__)


class Component(Protocol):
    async def start(self) -> None:
        """Bind listeners / start tasks; raise if that is impossible."""

    async def stop(self) -> None:
        """Release everything start() took; safe to call once after start()."""


class Server:
    """One sidecar: etcd sync, catalog, listeners and local agent, from one Settings."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        etcd_settings = settings.etcd
        self.etcd = EtcdClient(etcd_settings.endpoints, timeout=etcd_settings.request_timeout,
                               username=etcd_settings.username, password=etcd_settings.password)
        self.catalog = Catalog()
        self.sync = CatalogSync(self.etcd, etcd_settings.prefix, self.catalog, self.metrics.registry)
        self.leases = LeaseKeeper(self.etcd, etcd_settings.prefix, self.metrics.registry,
                                  refresh_interval=settings.registry.refresh_interval)
        self.admin = AdminApi(settings.admin, settings.registry, self.catalog, self.sync, self.leases, self.etcd,
                              self.metrics, self.readiness)
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
            tracing=Tracing.build(settings.tracing))
        self.components.append(self.proxy)
        self.admin.annotators.append(lambda agent: {"breaker": self.proxy.breaker_state(agent.id)})
        # Last, so that it is stopped first: the agent drains while DNS and the proxy still serve.
        self.local_agent: local_agent.LocalAgent | None = None
        if local_agent.enabled(settings.agent):
            self.local_agent = local_agent.LocalAgent(settings.agent, settings.health_check, self.leases,
                                                      self.metrics.health)
            self.components.append(self.local_agent)
        self._started: list[Component] = []
        self._listening = False

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
        await self.sync.start()
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
        await _bounded(self.sync.stop(), "stopping the etcd watch", bound)
        await _bounded(self.etcd.close(), "closing the etcd client", bound)

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
