"""One etcd prefix kept in step with a consumer: list, watch, resume, relist on compaction.

A ``PrefixWatch`` takes a prefix and a decode function and hands its sink
batches of ``Listed`` / ``Put`` / ``Gone`` changes carrying etcd revisions.
It resumes from the last revision it saw after a broken stream, relists when
that revision was compacted away, backs off while etcd is unreachable, and
says since when its view may be stale. The agent catalog, the dynamic
configuration and the A2A cards are uses of it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..errors import RegistryUnavailable, RevisionCompacted
from ..tasks import cancel_and_wait
from .etcd import EtcdClient, WatchEvent

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Listed(Generic[T]):
    """Every decodable value under the prefix, as read at ``revision`` (first list or relist)."""

    revision: int
    items: Mapping[str, T]
    # Each listed key's own mod revision (its version), where a use needs it.
    mod_revisions: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Put(Generic[T]):
    """``key`` was written at ``revision`` with a value that decoded to ``value``."""

    key: str
    value: T
    revision: int


@dataclass(frozen=True, slots=True)
class Gone:
    """``key`` was deleted at ``revision`` (or its lease expired, or its new value does not decode)."""

    key: str
    revision: int


Change = Listed[T] | Put[T] | Gone
# decode(key, raw value) -> the value, or None to skip it (the decoder logs and counts why).
Decode = Callable[[str, bytes], "T | None"]
Sink = Callable[[Sequence[Change[T]]], None]


@dataclass(frozen=True, slots=True)
class WatchCounters:
    """Optional metric children a watch counts into (labels put/delete and compacted/unavailable/error)."""

    events: Any = None
    restarts: Any = None
    relists: Any = None
    up: Any = None


class PrefixWatch(Generic[T]):
    """Keeps a sink in step with one etcd prefix."""

    def __init__(self, etcd: EtcdClient, prefix: str, decode: Decode[T], sink: Sink[T], *, name: str,
                 counters: WatchCounters | None = None, max_backoff: float = 2.0,
                 page_size: int = EtcdClient.LIST_PAGE) -> None:
        self._etcd = etcd
        self.page_size = page_size
        self.prefix = prefix
        self._decode = decode
        self._sink = sink
        self.name = name
        self._counters = counters or WatchCounters()
        self._max_backoff = max_backoff
        self.revision = 0
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        # Wall-clock time since which the view may be stale (None while the watch is up).
        self.stale_since: float | None = time.time()
        self.synced = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"watch-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    def stale_seconds(self) -> float:
        """Seconds since the view was last known current; 0 while the watch is up."""
        return 0.0 if self.stale_since is None else max(0.0, time.time() - self.stale_since)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                if self.revision == 0:
                    await self._relist()
                await self._watch()
            except asyncio.CancelledError:
                raise
            except RevisionCompacted as exc:
                log.warning("%s watch from revision %d compacted (now %d); relisting",
                            self.name, self.revision + 1, exc.compact_revision)
                self._count(self._counters.restarts, "compacted")
                self.revision = 0
                continue
            except RegistryUnavailable as exc:
                self._down(str(exc))
                self._count(self._counters.restarts, "unavailable")
            except Exception:
                log.exception("%s watch failed; retrying", self.name)
                self._down("internal error")
                self._count(self._counters.restarts, "error")
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._max_backoff)
            if self.connected:
                backoff = 0.05

    @staticmethod
    def _count(counter: Any, label: str | None = None) -> None:
        if counter is not None:
            (counter.labels(label) if label is not None else counter).inc()

    def _down(self, reason: str) -> None:
        if self.connected or self.stale_since is None:
            log.warning("lost the etcd watch of %s (%s); keeping the last view (revision %d)",
                        self.name, reason, self.revision)
        self.connected = False
        if self.stale_since is None:
            self.stale_since = time.time()
        if self._counters.up is not None:
            self._counters.up.set(0)

    def _up(self) -> None:
        if not self.connected:
            log.info("etcd watch of %s established at revision %d", self.name, self.revision)
        self.connected = True
        self.stale_since = None
        if self._counters.up is not None:
            self._counters.up.set(1)

    async def _relist(self) -> None:
        # Paged, all pages at the first one's revision (one consistent list); each page is decoded
        # as it comes, so only one page of raw values is held at a time.
        revision = 0
        items: dict[str, T] = {}
        mod_revisions: dict[str, int] = {}
        async for page_revision, kvs in self._etcd.list_pages(self.prefix, self.page_size):
            revision = page_revision  # the same for every page (list_pages yields at least one)
            for kv in kvs:
                value = self._decode(kv.key, kv.value)
                if value is not None:
                    items[kv.key] = value
                    mod_revisions[kv.key] = kv.mod_revision
        self._count(self._counters.relists)
        self.revision = revision
        self._sink([Listed(revision, items, mod_revisions)])

    async def _watch(self) -> None:
        stream = await self._etcd.watch_prefix(self.prefix, self.revision + 1)
        try:
            self._up()
            self.synced.set()
            async for batch in stream:
                changes = self._changes(batch)
                if changes:
                    self._sink(changes)
        finally:
            await stream.close()

    def _changes(self, batch: list[WatchEvent]) -> list[Change[T]]:
        changes: list[Change[T]] = []
        for event in batch:
            self.revision = max(self.revision, event.revision)
            if event.deleted:
                changes.append(Gone(event.key, event.revision))
                self._count(self._counters.events, "delete")
                continue
            value = self._decode(event.key, event.value)
            self._count(self._counters.events, "put")
            # A value that no longer decodes is dropped rather than served stale.
            changes.append(Gone(event.key, event.revision) if value is None
                           else Put(event.key, value, event.revision))
        return changes
