"""Immutable, indexed snapshots of the registered agents, and their subscribers.

Discovery is a stream of events (Reset / Upsert / Delete); the catalog folds a
batch of them into a new frozen Snapshot carrying the etcd revision and
notifies subscribers. Readers hold a snapshot and never lock. No I/O here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from .model import Agent

log = logging.getLogger(__name__)

_EMPTY: Mapping[str, tuple[Agent, ...]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Reset:
    """The whole registry as read at ``revision`` (initial list or relist)."""

    revision: int
    agents: Mapping[str, Agent]


@dataclass(frozen=True, slots=True)
class Upsert:
    """The agent at ``key`` was created or changed at ``revision``."""

    key: str
    agent: Agent
    revision: int


@dataclass(frozen=True, slots=True)
class Delete:
    """The agent at ``key`` was deleted (or its lease expired) at ``revision``."""

    key: str
    revision: int


Event = Reset | Upsert | Delete


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent view of the registry at an etcd revision.

    Index values are tuples of agents, healthy or not, in etcd key order as
    listed and then in order of arrival; callers filter on ``Agent.healthy``
    (and their own local state) and must not depend on the order.
    """

    revision: int = 0
    agents: Mapping[str, Agent] = field(default_factory=lambda: MappingProxyType({}))
    by_capability: Mapping[str, tuple[Agent, ...]] = field(default_factory=lambda: _EMPTY)
    by_name: Mapping[str, tuple[Agent, ...]] = field(default_factory=lambda: _EMPTY)
    by_id: Mapping[str, tuple[Agent, ...]] = field(default_factory=lambda: _EMPTY)

    def select(
        self,
        capability: str | None = None,
        tags: Iterable[str] = (),
        name: str | None = None,
        agent_id: str | None = None,
        healthy: bool | None = None,
    ) -> tuple[Agent, ...]:
        """Agents matching every given filter (labels are normalised by the caller)."""
        if capability is not None:
            found = self.by_capability.get(capability, ())
        elif name is not None:
            found = self.by_name.get(name, ())
        elif agent_id is not None:
            found = self.by_id.get(agent_id, ())
        else:
            found = tuple(self.agents.values())
        wanted = frozenset(tags)
        if name is not None and capability is not None:
            found = tuple(a for a in found if a.name_label == name)
        if agent_id is not None and (capability is not None or name is not None):
            found = tuple(a for a in found if a.id_label == agent_id)
        if wanted:
            found = tuple(a for a in found if wanted <= a.tag_labels)
        if healthy is not None:
            found = tuple(a for a in found if a.healthy == healthy)
        return found


Subscriber = Callable[[Snapshot, Sequence[Event]], None]


class Catalog:
    """Folds registry events into snapshots and tells subscribers about each one."""

    def __init__(self) -> None:
        # The current snapshot (never mutated; replaced by each applied batch). A plain attribute, not a
        # property: the proxy reads it on every request, and a property is a Python call. Read only.
        self.snapshot = Snapshot()
        self._agents: dict[str, Agent] = {}
        self._indexes: dict[str, dict[str, dict[str, Agent]]] = {"capability": {}, "name": {}, "id": {}}
        # The plain dicts behind the current snapshot's views: never mutated once published, and
        # copied (a C-level dict copy) for the next one. Copying the read-only proxy instead goes
        # key by key through the mapping protocol: ~3.5x slower, ~100 ms per change at 100,000 ids.
        self._views: dict[str, dict[str, tuple[Agent, ...]]] = {"capability": {}, "name": {}, "id": {}}
        self._subscribers: list[Subscriber] = []
        self.synced = False

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(snapshot, events)`` after every applied batch; returns an unsubscribe."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber) if subscriber in self._subscribers else None

    def apply(self, events: Sequence[Event]) -> Snapshot:
        """Fold a batch of events into a new snapshot, publish it and return it."""
        if not events:
            return self.snapshot
        dirty: dict[str, set[str]] = {"capability": set(), "name": set(), "id": set()}
        rebuilt = False
        revision = self.snapshot.revision
        for event in events:
            revision = max(revision, event.revision)
            if isinstance(event, Reset):
                self._agents = dict(event.agents)
                self._reindex()
                rebuilt = True
            elif isinstance(event, Upsert):
                self._remove(event.key, dirty)
                self._agents[event.key] = event.agent
                self._add(event.key, event.agent, dirty)
            else:
                self._remove(event.key, dirty)
                self._agents.pop(event.key, None)
        self.snapshot = self._build(revision, None if rebuilt else dirty)
        self.synced = True
        self._publish(events)
        return self.snapshot

    def _keys_of(self, agent: Agent) -> dict[str, Iterable[str]]:
        return {"capability": agent.capability_labels, "name": (agent.name_label,), "id": (agent.id_label,)}

    def _add(self, key: str, agent: Agent, dirty: dict[str, set[str]]) -> None:
        for kind, labels in self._keys_of(agent).items():
            index = self._indexes[kind]
            for lab in labels:
                index.setdefault(lab, {})[key] = agent
                dirty[kind].add(lab)

    def _remove(self, key: str, dirty: dict[str, set[str]]) -> None:
        old = self._agents.get(key)
        if old is None:
            return
        for kind, labels in self._keys_of(old).items():
            index = self._indexes[kind]
            for lab in labels:
                members = index.get(lab)
                if members is not None:
                    members.pop(key, None)
                    if not members:
                        del index[lab]
                dirty[kind].add(lab)

    def _reindex(self) -> None:
        self._indexes = {"capability": {}, "name": {}, "id": {}}
        scratch: dict[str, set[str]] = {"capability": set(), "name": set(), "id": set()}
        for key, agent in self._agents.items():
            self._add(key, agent, scratch)

    def _build(self, revision: int, dirty: dict[str, set[str]] | None) -> Snapshot:
        views = {}
        for kind, index in self._indexes.items():
            if dirty is None:
                view = {lab: _ordered(members) for lab, members in index.items()}
            elif not dirty[kind]:
                view = self._views[kind]
            else:
                view = self._views[kind].copy()
                for lab in dirty[kind]:
                    members = index.get(lab)
                    if members:
                        view[lab] = _ordered(members)
                    else:
                        view.pop(lab, None)
            self._views[kind] = view
            views[kind] = MappingProxyType(view)
        return Snapshot(
            revision=revision,
            agents=MappingProxyType(dict(self._agents)),
            by_capability=views["capability"],
            by_name=views["name"],
            by_id=views["id"],
        )

    def _publish(self, events: Sequence[Event]) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(self.snapshot, events)
            except Exception:
                log.exception("snapshot subscriber %r failed", subscriber)


def _ordered(members: Mapping[str, Agent]) -> tuple[Agent, ...]:
    # Insertion order (a C-level copy): sorting 10,000 keys on every event cost ~5 ms.
    return tuple(members.values())
