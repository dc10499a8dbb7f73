"""Discovery for every surface (admin API, gRPC, CLI, Python API): one query, one watch hub.

``Query`` is a pure selection over a snapshot. ``WatchHub`` fans the catalog's
changes out to subscribers, each through a bounded queue of its own: a
subscriber that falls behind is dropped to a fresh SNAPSHOT, and never blocks
the catalog or the other subscribers. A subscriber may resume from a revision:
the hub replays what it still holds in memory after that revision, or answers
RELIST (then a SNAPSHOT) when the revision is gone, compacted in etcd or older
than the hub's history.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .catalog import Catalog, Delete, Event, Reset, Snapshot, Upsert
from .model import Agent, label

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Query:
    """Which agents a caller wants; labels are normalised as DNS labels (see ``Query.of``)."""

    capability: str | None = None
    tags: tuple[str, ...] = ()
    name: str | None = None
    id: str | None = None
    healthy: bool | None = None

    @classmethod
    def of(cls, capability: str | None = None, tags: Iterable[str] = (), name: str | None = None,
           id: str | None = None, healthy: bool | None = None) -> Query:
        """A query from user input: empty strings mean no filter; tags may be comma-separated."""
        return cls(capability=label(capability) if capability else None,
                   tags=tuple(sorted({label(t) for value in tags for t in value.split(",") if t.strip()})),
                   name=label(name) if name else None, id=label(id) if id else None, healthy=healthy)

    def select(self, snapshot: Snapshot) -> tuple[Agent, ...]:
        """The snapshot's agents matching every filter of this query."""
        return snapshot.select(capability=self.capability, tags=self.tags, name=self.name, agent_id=self.id,
                               healthy=self.healthy)

    def matches(self, agent: Agent) -> bool:
        """Whether one agent matches every filter of this query."""
        return ((self.capability is None or self.capability in agent.capability_labels)
                and (self.name is None or agent.name_label == self.name)
                and (self.id is None or agent.id_label == self.id)
                and (not self.tags or frozenset(self.tags) <= agent.tag_labels)
                and (self.healthy is None or agent.healthy == self.healthy))


Annotate = Callable[[str, Agent], Mapping[str, Any]]


def agent_document(key: str, agent: Agent, annotate: Annotate | None = None) -> dict[str, Any]:
    """One agent as the surfaces show it: its JSON, its etcd key, and any per-sidecar annotations."""
    body = agent.to_json()
    body["key"] = key
    if annotate is not None:
        body.update(annotate(key, agent))
    return body


# The per-agent fields of ``GET /v1/agents`` that only a running sidecar knows: ``owned`` (it keeps
# the agent's lease) and ``breaker`` (its proxy's breaker state). A reader of etcd alone keeps no
# lease and has no proxy, so its document has them as these values (``sidecar agents --json``).
SIDECAR_FIELDS: Mapping[str, Any] = {"owned": False, "breaker": None}


def without_sidecar(key: str, agent: Agent) -> Mapping[str, Any]:
    """The sidecar-only fields as a reader of etcd alone has them (see ``SIDECAR_FIELDS``)."""
    return SIDECAR_FIELDS


def agents_document(snapshot: Snapshot, query: Query, prefix: str, annotate: Annotate = without_sidecar,
                    pending: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The ``GET /v1/agents`` document (also ``sidecar agents --json``): the revision, the matching agents
    (each with the sidecar fields ``annotate`` gives), and the registrations ``pending`` in this sidecar."""
    return {"revision": snapshot.revision,
            "agents": [agent_document(a.key(prefix), a, annotate) for a in query.select(snapshot)],
            "pending": list(pending)}


class Kind(enum.StrEnum):
    SNAPSHOT = "snapshot"
    UPSERT = "upsert"
    DELETE = "delete"
    RELIST = "relist"


@dataclass(frozen=True, slots=True)
class Update:
    """One message to a subscriber: the whole selection (SNAPSHOT), one change, or RELIST.

    ``agents`` holds (key, agent) pairs: every matching agent for SNAPSHOT, the
    new record for UPSERT, the last known record for DELETE, none for RELIST.
    """

    kind: Kind
    revision: int
    agents: tuple[tuple[str, Agent], ...] = ()


@dataclass(frozen=True, slots=True)
class _Change:
    revision: int
    key: str
    agent: Agent  # the new record, or for a delete the last known one
    deleted: bool


Compacted = Callable[[int], Awaitable[bool]]


def _as_update(query: Query, change: _Change) -> Update:
    # Replayed changes: what the subscriber held then is unknown, so a change that does
    # not match is sent as a DELETE (deleting what one does not hold is a no-op).
    kind = Kind.UPSERT if not change.deleted and query.matches(change.agent) else Kind.DELETE
    return Update(kind, change.revision, ((change.key, change.agent),))


async def _never_compacted(revision: int) -> bool:
    return False


class Subscription:
    """A subscriber's view of the hub: iterate it for Updates; ``close()`` when done."""

    def __init__(self, hub: WatchHub, query: Query, limit: int) -> None:
        self._hub = hub
        self.query = query
        self._limit = limit
        self._queue: deque[Update] = deque()
        self._wake = asyncio.Event()
        self._known: set[str] = set()
        self._snapshot_due = False
        self._relist_due = False
        self.closed = False
        self.lagged = 0

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Update:
        while True:
            if self._relist_due:
                self._relist_due = False
                self._snapshot_due = True
                return Update(Kind.RELIST, self._hub.snapshot.revision)
            if self._snapshot_due:
                self._snapshot_due = False
                self._queue.clear()
                return self._snapshot()
            if self._queue:
                return self._queue.popleft()
            if self.closed:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    async def next_batch(self) -> list[Update]:
        """The next update and every one already waiting behind it; empty once closed."""
        try:
            batch = [await self.__anext__()]
        except StopAsyncIteration:
            return []
        while self._queue and not (self._snapshot_due or self._relist_due):
            batch.append(self._queue.popleft())
        return batch

    def close(self) -> None:
        """Stop receiving; a reader waiting in ``__anext__`` ends."""
        if not self.closed:
            self.closed = True
            self._hub._drop(self)
            self._wake.set()

    def _snapshot(self) -> Update:
        snapshot = self._hub.snapshot
        match = self.query.matches
        agents = tuple((key, agent) for key, agent in snapshot.agents.items() if match(agent))
        self._known = {key for key, _ in agents}
        return Update(Kind.SNAPSHOT, snapshot.revision, agents)

    def _offer(self, update: Update) -> None:
        if len(self._queue) >= self._limit:
            # Fallen behind: everything queued is in the current snapshot; send that instead.
            self._queue.clear()
            self._snapshot_due = True
            self.lagged += 1
            self._hub._lagged()
        elif not (self._snapshot_due or self._relist_due):
            self._queue.append(update)
        self._wake.set()

    def _resnapshot(self) -> None:
        self._queue.clear()
        self._snapshot_due = True
        self._wake.set()

    def _relist(self) -> None:
        self._queue.clear()
        self._relist_due = True
        self._wake.set()

    def _offer_change(self, change: _Change) -> None:
        key = change.key
        if not change.deleted and self.query.matches(change.agent):
            self._known.add(key)
            self._offer(Update(Kind.UPSERT, change.revision, ((key, change.agent),)))
        elif key in self._known:
            # Deleted, or changed so that it no longer matches: gone from this subscriber's view.
            self._known.discard(key)
            self._offer(Update(Kind.DELETE, change.revision, ((key, change.agent),)))


class WatchHub:
    """Fans the catalog's changes out to subscribers, with a bounded history for resuming."""

    def __init__(self, catalog: Catalog, *, queue_size: int = 1024, history: int = 10000,
                 compacted: Compacted = _never_compacted,
                 on_lag: Callable[[], None] | None = None) -> None:
        self._catalog = catalog
        self._queue_size = queue_size
        self._history: deque[_Change] = deque(maxlen=history)
        # Every change after this revision is in _history (a relist or a full ring moves it up).
        self._floor = catalog.snapshot.revision
        self._compacted = compacted
        self._on_lag = on_lag
        self._subscribers: set[Subscription] = set()
        self.snapshot = catalog.snapshot
        self._unsubscribe = catalog.subscribe(self._on_batch)

    @property
    def subscribers(self) -> int:
        """How many subscriptions are open."""
        return len(self._subscribers)

    def close(self) -> None:
        """Stop following the catalog and end every subscription."""
        self._unsubscribe()
        for subscription in list(self._subscribers):
            subscription.close()

    async def subscribe(self, query: Query, from_revision: int | None = None) -> Subscription:
        """A subscription that starts with a SNAPSHOT, or with the changes after ``from_revision``.

        When ``from_revision`` is gone (compacted in etcd, or older than the history
        held here) the subscription starts with RELIST, then a SNAPSHOT.
        """
        subscription = Subscription(self, query, self._queue_size)
        current = self.snapshot
        # Registered before any await, so nothing published from here on is missed.
        subscription._known = {k for k, a in current.agents.items() if query.matches(a)}
        self._subscribers.add(subscription)
        if from_revision is None:
            subscription._resnapshot()
            return subscription
        if from_revision >= current.revision:
            return subscription
        missed = [c for c in self._history if from_revision < c.revision <= current.revision]
        if from_revision < self._floor or await self._compacted(from_revision + 1):
            subscription._relist()
            return subscription
        replay = [_as_update(query, change) for change in missed]
        subscription._queue.extendleft(reversed(replay))
        return subscription

    def _drop(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def _lagged(self) -> None:
        if self._on_lag is not None:
            self._on_lag()

    def _on_batch(self, snapshot: Snapshot, events: Sequence[Event]) -> None:
        previous = self.snapshot.agents
        self.snapshot = snapshot
        changes: list[_Change] = []
        latest: dict[str, Agent] = {}
        for event in events:
            if isinstance(event, Reset):
                self._history.clear()
                self._floor = event.revision
                changes.clear()
                latest.clear()
                for subscription in list(self._subscribers):
                    subscription._resnapshot()
                continue
            if isinstance(event, Upsert):
                latest[event.key] = event.agent
                changes.append(_Change(event.revision, event.key, event.agent, False))
            elif isinstance(event, Delete):
                last = latest.pop(event.key, None) or previous.get(event.key)
                if last is not None:
                    changes.append(_Change(event.revision, event.key, last, True))
        for change in changes:
            if len(self._history) == self._history.maxlen:
                self._floor = self._history[0].revision
            self._history.append(change)
        for subscription in list(self._subscribers):
            for change in changes:
                subscription._offer_change(change)
