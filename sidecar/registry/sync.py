"""etcd watch -> catalog: list, watch from the next revision, resume, relist on compaction.

While etcd is unreachable the catalog keeps its last snapshot; ``stale_since``
and the metrics say since when it may be out of date.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from ..catalog import Catalog, Delete, Event, Reset, Upsert
from ..errors import RegistryUnavailable, RevisionCompacted, ValidationError
from ..metrics import RegistryMetrics
from ..model import Agent, decode_agent
from .etcd import EtcdClient, WatchEvent

log = logging.getLogger(__name__)


def services_prefix(prefix: str) -> str:
    """The etcd key prefix under which agents live."""
    return f"{prefix}/services/"


class CatalogSync:
    """Keeps a Catalog in step with ``{prefix}/services/`` in etcd."""

    def __init__(self, etcd: EtcdClient, prefix: str, catalog: Catalog, metrics: RegistryMetrics,
                 *, max_backoff: float = 2.0) -> None:
        self._etcd = etcd
        self._prefix = services_prefix(prefix)
        self._catalog = catalog
        self._metrics = metrics
        self._max_backoff = max_backoff
        self._revision = 0
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        # Wall-clock time since which the snapshot may be stale (None while the watch is up).
        self.stale_since: float | None = time.time()
        self.synced = asyncio.Event()
        metrics.stale_seconds.set_function(self.stale_seconds)
        # Counted when scraped, not on every event (an O(agents) walk).
        metrics.snapshot_healthy_agents.set_function(
            lambda: sum(1 for a in self._catalog.snapshot.agents.values() if a.healthy))

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="catalog-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def stale_seconds(self) -> float:
        """Seconds since the snapshot was last known current; 0 while the watch is up."""
        return 0.0 if self.stale_since is None else max(0.0, time.time() - self.stale_since)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                if self._revision == 0:
                    await self._relist()
                await self._watch()
            except asyncio.CancelledError:
                raise
            except RevisionCompacted as exc:
                log.warning("watch from revision %d compacted (now %d); relisting",
                            self._revision + 1, exc.compact_revision)
                self._metrics.watch_restarts.labels("compacted").inc()
                self._revision = 0
                continue
            except RegistryUnavailable as exc:
                self._down(str(exc))
                self._metrics.watch_restarts.labels("unavailable").inc()
            except Exception:
                log.exception("catalog sync failed; retrying")
                self._down("internal error")
                self._metrics.watch_restarts.labels("error").inc()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._max_backoff)
            if self.connected:
                backoff = 0.05

    def _down(self, reason: str) -> None:
        if self.connected or self.stale_since is None:
            log.warning("lost the etcd watch (%s); serving the last snapshot (revision %d)",
                        reason, self._catalog.snapshot.revision)
        self.connected = False
        if self.stale_since is None:
            self.stale_since = time.time()
        self._metrics.etcd_up.set(0)

    def _up(self) -> None:
        if not self.connected:
            log.info("etcd watch established at revision %d", self._revision)
        self.connected = True
        self.stale_since = None
        self._metrics.etcd_up.set(1)

    async def _relist(self) -> None:
        revision, kvs = await self._etcd.get_prefix(self._prefix)
        agents: dict[str, Agent] = {}
        for kv in kvs:
            agent = self._decode(kv.key, kv.value)
            if agent is not None:
                agents[kv.key] = agent
        self._metrics.relists.inc()
        self._revision = revision
        self._publish([Reset(revision, agents)])

    async def _watch(self) -> None:
        stream = await self._etcd.watch_prefix(self._prefix, self._revision + 1)
        try:
            self._up()
            self.synced.set()
            async for batch in stream:
                self._publish(self._events(batch))
        finally:
            await stream.close()

    def _events(self, batch: list[WatchEvent]) -> list[Event]:
        events: list[Event] = []
        for change in batch:
            self._revision = max(self._revision, change.revision)
            if change.deleted:
                events.append(Delete(change.key, change.revision))
                self._metrics.watch_events.labels("delete").inc()
                continue
            agent = self._decode(change.key, change.value)
            self._metrics.watch_events.labels("put").inc()
            # A value that no longer parses is dropped rather than served stale.
            events.append(Delete(change.key, change.revision) if agent is None
                          else Upsert(change.key, agent, change.revision))
        return events

    def _publish(self, events: list[Event]) -> None:
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

