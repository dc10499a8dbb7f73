"""The Python API: register agents and discover them, as the original Go Register/Discover."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from ..catalog import Catalog, Snapshot
from ..discovery import Query, Update, WatchHub
from ..metrics import Metrics
from ..model import Agent, new_agent_id, parse_agent
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
                 timeout: float = 5.0, metrics: Metrics | None = None, client: EtcdClient | None = None) -> None:
        self.metrics = metrics or Metrics()
        # ``client``: one built from full settings (auth, TLS); else plaintext to ``endpoints``.
        self.etcd = client or EtcdClient(endpoints, timeout=timeout)
        self.catalog = Catalog()
        self.leases = LeaseKeeper(self.etcd, prefix, self.metrics.registry)
        self.sync = CatalogSync(self.etcd, prefix, self.catalog, self.metrics.registry)
        self.hub = WatchHub(self.catalog)
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
        return Query.of(capability, tags, name, healthy=healthy).select(snapshot)

    async def watch(self, capability: str | None = None, tags: Iterable[str] = (), name: str | None = None,
                    *, from_revision: int | None = None) -> AsyncIterator[Update]:
        """A SNAPSHOT of the matching agents after the first sync, then each UPSERT/DELETE, in order.

        With ``from_revision`` it starts with the changes after it instead (or RELIST, then a
        SNAPSHOT, when that revision is gone); a watcher that falls behind gets a fresh SNAPSHOT.
        """
        await self.snapshot()
        subscription = await self.hub.subscribe(Query.of(capability, tags, name), from_revision)
        try:
            async for update in subscription:
                yield update
        finally:
            subscription.close()

    async def close(self) -> None:
        """Deregister every agent this client registered and disconnect."""
        await self.leases.close()
        self.hub.close()
        await self.sync.stop()
        await self.etcd.close()
