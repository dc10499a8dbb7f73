"""The Python API: register agents and discover them, as the original Go Register/Discover."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from ..catalog import Catalog, Event, Snapshot
from ..metrics import Metrics
from ..model import Agent, label, new_agent_id, parse_agent
from .etcd import EtcdClient
from .lease import LeaseKeeper, Registration
from .sync import CatalogSync


class Registry:
    """An etcd-backed registry client.

    ``async with Registry(["http://127.0.0.1:2379"]) as r:`` then
    ``await r.register(name=..., address=..., port=..., capabilities=[...])``
    (a handle that keeps the lease alive; ``close()`` deregisters) and
    ``await r.discover("chat")`` (healthy agents from the watched snapshot).
    """

    def __init__(self, endpoints: Sequence[str] = ("http://127.0.0.1:2379",), *, prefix: str = "",
                 timeout: float = 5.0, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.etcd = EtcdClient(endpoints, timeout=timeout)
        self.catalog = Catalog()
        self.leases = LeaseKeeper(self.etcd, prefix, self.metrics.registry)
        self.sync = CatalogSync(self.etcd, prefix, self.catalog, self.metrics.registry)
        self._started = False

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def register(self, agent: Agent | None = None, **fields: Any) -> Registration:
        """Register ``agent`` (or one built from JSON-style ``fields``); returns its lease handle."""
        if agent is None:
            fields.setdefault("id", new_agent_id(str(fields.get("name", "agent"))))
            agent = parse_agent(fields, strict=True)
        return await self.leases.register(agent)

    async def snapshot(self) -> Snapshot:
        """The current snapshot, after the first sync with etcd."""
        if not self._started:
            self._started = True
            await self.sync.start()
        await self.sync.synced.wait()
        return self.catalog.snapshot

    async def discover(self, capability: str | None = None, tags: Iterable[str] = (), name: str | None = None,
                       *, healthy: bool | None = True) -> tuple[Agent, ...]:
        """Agents with the capability (and every tag, and the name), healthy ones by default."""
        snapshot = await self.snapshot()
        return snapshot.select(
            capability=label(capability) if capability else None,
            tags=[label(t) for t in tags],
            name=label(name) if name else None,
            healthy=healthy,
        )

    async def watch(self) -> AsyncIterator[tuple[Snapshot, Sequence[Event]]]:
        """Each new snapshot with the events that made it, starting after the first sync."""
        queue: asyncio.Queue[tuple[Snapshot, Sequence[Event]]] = asyncio.Queue()
        unsubscribe = self.catalog.subscribe(lambda s, e: queue.put_nowait((s, e)))
        try:
            await self.snapshot()
            while True:
                yield await queue.get()
        finally:
            unsubscribe()

    async def close(self) -> None:
        """Deregister every agent this client registered and disconnect."""
        await self.leases.close()
        await self.sync.stop()
        await self.etcd.close()
