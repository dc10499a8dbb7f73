"""Registrations this process owns: lease grant + put, keepalive, re-register, revoke.

One task per registration refreshes its lease about every TTL/3. If etcd says
the lease is gone (an outage longer than the TTL, a revoke, a leader change),
the agent is written again under a new lease with its current record; while
etcd is unreachable the task keeps trying, so the agent comes back by itself.

A registration that cannot reach etcd at all (quorum lost, etcd down) may be
kept **pending** instead of refused (``register(..., keep_pending=True)``, what
the admin and gRPC APIs ask for), as Consul's local agent keeps local state and
syncs it by anti-entropy: one task retries the oldest pending registration with
backoff and, once etcd answers, writes all of them. Each pending registration
keeps the lease id chosen for its first attempt, and the write is the same
compare-and-swap on create, so an attempt that landed unseen is recognised as
its own (no duplicate, no orphan key) and an id another owner took meanwhile is
dropped with a warning (``sidecar_registry_pending_resolved_total{outcome="conflict"}``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

from ..cards import card_key
from ..errors import AgentExists, LeaseNotFound, RegistryUnavailable
from ..metrics import RegistryMetrics
from ..model import Agent, now_rfc3339
from ..tasks import cancel_and_wait
from .etcd import EtcdClient

log = logging.getLogger(__name__)


class Registration:
    """A handle on one registered agent; its lease lives until ``close()``."""

    def __init__(self, keeper: LeaseKeeper, agent: Agent, key: str, lease_id: int, *, pending: bool = False) -> None:
        self._keeper = keeper
        self.agent = agent
        self.key = key
        self.lease_id = lease_id
        # Pending: accepted while etcd was unreachable, not written yet (``lease_id`` is the id it will use).
        self.pending = pending
        self.accepted = time.monotonic()
        self.registered = not pending
        # Other keys that live and die with the agent (its A2A card), written under the same lease.
        self.attachments: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def attach(self, key: str, value: bytes | None) -> None:
        """Store ``key`` under this registration's lease (None removes it); rewritten after a lease loss."""
        if self.pending:
            if value is None:
                self.attachments.pop(key, None)
            else:
                self.attachments[key] = value
            return  # written with the registration
        if value is None:
            if self.attachments.pop(key, None) is not None:
                await self._keeper.etcd.delete(key)
            return
        self.attachments[key] = value
        try:
            await self._keeper.etcd.put(key, value, self.lease_id)
        except RegistryUnavailable:
            self.registered = False
            raise

    async def attach_card(self, raw: bytes) -> None:
        """Store the agent's A2A card (its bytes as served) at ``{prefix}/cards/{name}/{id}`` on this lease."""
        await self.attach(card_key(self._keeper.prefix, self.agent.name, self.agent.id), raw)

    async def update(self, agent: Agent) -> None:
        """Write a changed record (e.g. a health status) under the same lease.

        If etcd is unreachable the change is kept and written when the lease is
        renewed or the agent re-registered.
        """
        if agent.key(self._keeper.prefix) != self.key:
            raise ValueError("an update cannot change the agent's name or id")
        self.agent = agent
        if self.pending:
            return  # written with the registration
        try:
            await self._keeper.etcd.put(self.key, agent.to_bytes(), self.lease_id)
        except RegistryUnavailable:
            self.registered = False
            raise

    @property
    def state(self) -> str:
        """``pending`` (not in etcd yet) or ``registered``."""
        return "pending" if self.pending else "registered"

    async def close(self) -> None:
        """Stop the keepalive and revoke the lease (the agent disappears at once); cancel it if pending."""
        if self._closed:
            return
        self._closed = True
        self._keeper._forget(self)
        if self._task is not None:
            failure = await cancel_and_wait(self._task)
            if failure is not None:  # a pending write that had failed already (etcd unreachable)
                log.debug("last write of %s before close: %s", self.key, failure)
        if self.pending:
            # A write in flight may have landed unseen: its lease goes too (or expires within the TTL).
            self._keeper._in_background(self._keeper._revoke_quietly(self.lease_id))
            return
        try:
            await self._keeper.etcd.revoke(self.lease_id)
        except RegistryUnavailable:
            log.warning("could not revoke the lease of %s; it expires within %gs", self.key, self.agent.ttl)

    async def __aenter__(self) -> Registration:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class LeaseKeeper:
    """Owns the leases of the agents this process registered."""

    def __init__(self, etcd: EtcdClient, prefix: str, metrics: RegistryMetrics,
                 *, refresh_interval: float = 0.0) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self._metrics = metrics
        self._refresh_interval = refresh_interval
        self._registrations: dict[str, Registration] = {}
        self._pending: dict[str, Registration] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    def update(self, refresh_interval: float) -> None:
        """A new keepalive interval (0: a third of each TTL), used from each lease's next refresh."""
        self._refresh_interval = refresh_interval

    @property
    def registrations(self) -> dict[str, Registration]:
        """Owned registrations (written to etcd) by etcd key."""
        return dict(self._registrations)

    @property
    def pending(self) -> dict[str, Registration]:
        """Registrations accepted while etcd was unreachable and not written yet, by etcd key."""
        return dict(self._pending)

    async def register(self, agent: Agent, *, keep_pending: bool = False) -> Registration:
        """Grant a lease of the agent's TTL, put the agent under it, keep it alive.

        Raises RegistryUnavailable when etcd cannot be reached, unless ``keep_pending``:
        then the registration is kept (``pending`` is true) and written as soon as etcd
        answers. Raises AgentExists when another owner holds the id. Registering a key
        this keeper already owns (or holds pending) replaces that registration.
        """
        if not agent.register_time:
            agent = _stamped(agent)
        key = agent.key(self.prefix)
        queued = self._pending.get(key)
        # A pending registration of this key may have landed unseen: the same lease id recognises it.
        lease_id = queued.lease_id if queued is not None else self.etcd.new_lease_id()
        started = time.perf_counter()
        try:
            await self._write(agent, key, lease_id, keep_lease=keep_pending)
        except RegistryUnavailable:
            if not keep_pending:
                self._metrics.registrations.labels("error").inc()
                raise
            self._metrics.registrations.labels("pending").inc()
            return self._queue(agent, key, lease_id)
        except AgentExists:
            self._metrics.registrations.labels("error").inc()
            raise
        self._metrics.registration_seconds.observe(time.perf_counter() - started)
        self._metrics.registrations.labels("ok").inc()
        if queued is not None and self._pending.get(key) is queued:
            self._drop_pending(queued, "replaced")
        registration = Registration(self, agent, key, lease_id)
        self._own(registration)
        return registration

    def find(self, agent_id: str) -> Registration | None:
        """The owned (else pending) registration of the agent with this id, if any."""
        found = self.owned(agent_id)
        return found[0] if found else None

    def owned(self, agent_id: str) -> list[Registration]:
        """This keeper's registrations of the agent with this id: written ones first, then pending ones."""
        return [r for r in (*self._registrations.values(), *self._pending.values()) if r.agent.id == agent_id]

    async def close(self) -> None:
        """Revoke every owned lease and cancel the pending registrations (graceful shutdown)."""
        if self._flusher is not None:
            self._flusher.cancel()
        everything = [*self._registrations.values(), *self._pending.values()]
        await asyncio.gather(*(r.close() for r in everything), return_exceptions=True)
        if self._background:
            await asyncio.wait(self._background, timeout=self.etcd.timeout)

    def _own(self, registration: Registration, first_refresh: float | None = None) -> None:
        """Make ``registration`` the owned one of its key (replacing and revoking a previous one)."""
        key = registration.key
        previous = self._registrations.get(key)
        self._registrations[key] = registration
        self._metrics.owned_agents.set(len(self._registrations))
        if previous is not None and previous is not registration:
            previous._closed = True
            if previous._task is not None:
                previous._task.cancel()
            if previous.lease_id != registration.lease_id:
                self._in_background(self._revoke_quietly(previous.lease_id))
        registration._task = asyncio.get_running_loop().create_task(
            self._keepalive(registration, first_refresh), name=f"lease:{key}")

    def _forget(self, registration: Registration) -> None:
        if self._registrations.get(registration.key) is registration:
            del self._registrations[registration.key]
            self._metrics.owned_agents.set(len(self._registrations))
        if self._pending.get(registration.key) is registration:
            self._drop_pending(registration, "cancelled")

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _lease_ids(self) -> set[int]:
        """Every lease this keeper holds or will hold: a record under one of them is ours to replace."""
        return {r.lease_id for r in (*self._registrations.values(), *self._pending.values()) if r.lease_id}

    async def _write(self, agent: Agent, key: str, lease_id: int = 0, *, keep_lease: bool = False) -> int:
        """Grant (under ``lease_id``: 0 a new one) and put with compare-and-swap on create; returns the lease.

        ``keep_lease``: a failure to reach etcd leaves the lease alone (the pending
        registration grants it again under the same id); another owner's record
        always revokes it.
        """
        lease_id = await self.etcd.grant(max(2, math.ceil(agent.ttl)), lease_id)
        # Ours to replace: a record under a lease this keeper holds; anyone else's is refused.
        mine = self._lease_ids() | {lease_id}
        try:
            await self.etcd.put_owned(key, agent.to_bytes(), lease_id, mine)
        except AgentExists:
            await self._revoke_quietly(lease_id)
            raise
        except BaseException:
            if not keep_lease:
                await self._revoke_quietly(lease_id)
            raise
        return lease_id

    # Pending registrations (etcd unreachable when they came): kept here, written by one task.

    def _queue(self, agent: Agent, key: str, lease_id: int) -> Registration:
        previous = self._pending.get(key)
        if previous is not None:
            self._drop_pending(previous, "replaced")
        registration = Registration(self, agent, key, lease_id, pending=True)
        self._pending[key] = registration
        self._metrics.pending_registrations.set(len(self._pending))
        log.warning("etcd unreachable: registration of %s kept pending, written when etcd answers", key)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush(), name="pending-registrations")
        return registration

    def _drop_pending(self, registration: Registration, outcome: str) -> None:
        """No longer pending: written (``registered``), or given up (its lease is left to the caller)."""
        if self._pending.get(registration.key) is registration:
            del self._pending[registration.key]
            self._metrics.pending_registrations.set(len(self._pending))
            self._metrics.pending_resolved.labels(outcome).inc()
        if outcome != "registered":
            registration._closed = True
            if registration._task is not None:
                registration._task.cancel()

    async def _flush(self) -> None:
        """Until nothing is pending: try the oldest; once etcd takes it, write all the others too."""
        delay = 0.1
        while self._pending:
            head, *rest = list(self._pending.values())
            if not await self._try_pending(head):
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(1.0, delay * 2)
                continue
            delay = 0.1
            if rest:
                await asyncio.gather(*(self._try_pending(r) for r in rest))

    async def _try_pending(self, registration: Registration) -> bool:
        """One attempt at writing a pending registration; False while etcd is still unreachable."""
        if self._pending.get(registration.key) is not registration:
            return True  # cancelled or replaced meanwhile
        task = asyncio.get_running_loop().create_task(self._write_pending(registration))
        registration._task = task
        try:
            await asyncio.wait({task})
        finally:
            if not task.done():
                task.cancel()
        if task.cancelled():
            return True  # cancelled by a DELETE or a newer registration of the key
        error = task.exception()
        if error is None:
            return True
        if isinstance(error, AgentExists):
            log.warning("pending registration of %s dropped: another owner registered this id meanwhile "
                        "(its lease %x); nothing of ours was written", registration.key, error.lease)
            self._drop_pending(registration, "conflict")
            return True
        if isinstance(error, (RegistryUnavailable, LeaseNotFound, TimeoutError)):
            log.debug("pending registration of %s still not written: %s", registration.key, error)
            return False
        log.error("pending registration of %s dropped: %r", registration.key, error)
        self._drop_pending(registration, "error")
        return True

    async def _write_pending(self, registration: Registration) -> None:
        agent = registration.agent
        await self._write(agent, registration.key, registration.lease_id, keep_lease=True)
        registration.registered = registration.agent is agent  # else an update came meanwhile: written next
        await self._write_attachments(registration)
        if self._pending.get(registration.key) is not registration:
            return  # cancelled while the last write was answered: close() revokes the lease
        self._drop_pending(registration, "registered")
        registration.pending = False
        waited = time.monotonic() - registration.accepted
        self._metrics.registrations.labels("ok").inc()
        log.warning("pending registration of %s written to etcd after %.1fs", registration.key, waited)
        # The lease may have been granted by an earlier attempt: refresh it at once.
        self._own(registration, first_refresh=0.0)

    async def _write_attachments(self, registration: Registration) -> None:
        for key, value in list(registration.attachments.items()):
            await self.etcd.put(key, value, registration.lease_id)

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self.etcd.revoke(lease_id)
        except (RegistryUnavailable, asyncio.CancelledError):
            pass

    def _interval(self, agent: Agent) -> float:
        return self._refresh_interval or max(0.5, agent.ttl / 3)

    async def _keepalive(self, registration: Registration, first_refresh: float | None = None) -> None:
        interval = self._interval(registration.agent)
        # Spread the refreshes of agents registered in one burst.
        await asyncio.sleep(interval * random.uniform(0.5, 1.0) if first_refresh is None else first_refresh)
        # Retries after a failed refresh: soon at first (the lease still runs, and the next
        # stream goes to another member), then doubling to about a second during an outage.
        backoff = 0.2
        while True:
            try:
                # A healthy refresh takes milliseconds; waiting longer than half an interval
                # on a stuck member would spend the lease's remaining TTL.
                await self.etcd.refresh(registration.lease_id, timeout=max(0.2, interval / 2))
                if not registration.registered:
                    # A write failed while etcd was down: write the current record again.
                    await self.etcd.put(registration.key, registration.agent.to_bytes(), registration.lease_id)
                    await self._write_attachments(registration)
                    registration.registered = True
                backoff = 0.2
                await asyncio.sleep(interval)
                continue
            except asyncio.CancelledError:
                raise
            except LeaseNotFound:
                log.warning("lease of %s is gone; registering again", registration.key)
            except (TimeoutError, RegistryUnavailable) as exc:
                self._metrics.keepalive_failures.inc()
                log.debug("keepalive of %s failed: %s", registration.key, exc)
                registration.registered = False
                await asyncio.sleep(min(interval, 1.0) * backoff * random.uniform(0.5, 1.0))
                backoff = min(1.0, backoff * 2)
                continue
            try:
                registration.lease_id = await self._write(registration.agent, registration.key)
                await self._write_attachments(registration)
                registration.registered = True
                self._metrics.reregistrations.inc()
                log.info("registered %s again under lease %x", registration.key, registration.lease_id)
            except (TimeoutError, RegistryUnavailable, LeaseNotFound, AgentExists) as exc:
                self._metrics.keepalive_failures.inc()
                registration.registered = False
                log.log(logging.WARNING if isinstance(exc, AgentExists) else logging.DEBUG,
                        "re-registration of %s failed: %s", registration.key, exc)
                await asyncio.sleep(min(interval, 1.0) * random.uniform(0.5, 1.0))
                continue
            await asyncio.sleep(interval)


def _stamped(agent: Agent) -> Agent:
    return replace(agent, register_time=now_rfc3339())
