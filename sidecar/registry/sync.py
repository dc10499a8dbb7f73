"""etcd -> catalog: the agents under ``{prefix}/services/``, through one PrefixWatch.

While etcd is unreachable the catalog keeps its last snapshot; ``stale_since``
and the metrics say since when it may be out of date.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from ..catalog import Catalog, Delete, Event, Reset, Upsert
from ..errors import ValidationError
from ..metrics import RegistryMetrics
from ..model import Agent, decode_agent
from .etcd import EtcdClient
from .watch import Change, Gone, Listed, PrefixWatch, WatchCounters

log = logging.getLogger(__name__)


def services_prefix(prefix: str) -> str:
    """The etcd key prefix under which agents live."""
    return f"{prefix}/services/"


class CatalogSync:
    """Keeps a Catalog in step with ``{prefix}/services/`` in etcd."""

    def __init__(self, etcd: EtcdClient, prefix: str, catalog: Catalog, metrics: RegistryMetrics,
                 *, max_backoff: float = 2.0) -> None:
        self._catalog = catalog
        self._metrics = metrics
        counters = WatchCounters(events=metrics.watch_events, restarts=metrics.watch_restarts,
                                 relists=metrics.relists, up=metrics.etcd_up)
        self.watch: PrefixWatch[Agent] = PrefixWatch(etcd, services_prefix(prefix), self._decode, self._apply,
                                                     name="agents", counters=counters, max_backoff=max_backoff)
        metrics.stale_seconds.set_function(self.watch.stale_seconds)
        # Counted when scraped, not on every event (an O(agents) walk).
        metrics.snapshot_healthy_agents.set_function(
            lambda: sum(1 for a in self._catalog.snapshot.agents.values() if a.healthy))

    @property
    def synced(self) -> asyncio.Event:
        return self.watch.synced

    @property
    def connected(self) -> bool:
        return self.watch.connected

    @property
    def stale_since(self) -> float | None:
        return self.watch.stale_since

    def stale_seconds(self) -> float:
        return self.watch.stale_seconds()

    async def start(self) -> None:
        await self.watch.start()

    async def stop(self) -> None:
        await self.watch.stop()

    def _apply(self, changes: Sequence[Change[Agent]]) -> None:
        events: list[Event] = []
        for change in changes:
            if isinstance(change, Listed):
                events.append(Reset(change.revision, change.items))
            elif isinstance(change, Gone):
                events.append(Delete(change.key, change.revision))
            else:
                events.append(Upsert(change.key, change.value, change.revision))
        snapshot = self._catalog.apply(events)
        self._metrics.snapshot_revision.set(snapshot.revision)
        self._metrics.snapshot_agents.set(len(snapshot.agents))

    def _decode(self, key: str, value: bytes) -> Agent | None:
        try:
            return decode_agent(value)
        except (ValueError, ValidationError) as exc:
            log.warning("skipping %s: value does not parse: %s", key, exc)
            self._metrics.invalid_values.inc()
            return None
