"""Registrations this process owns: lease grant + put, keepalive, re-register, revoke.

One task per registration refreshes its lease about every TTL/3. If etcd says
the lease is gone (an outage longer than the TTL, a revoke, a leader change),
the agent is written again under a new lease with its current record; while
etcd is unreachable the task keeps trying, so the agent comes back by itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import replace

from ..errors import AgentExists, LeaseNotFound, RegistryUnavailable
from ..metrics import RegistryMetrics
from ..model import Agent, now_rfc3339
from .etcd import EtcdClient

log = logging.getLogger(__name__)


class Registration:
    """A handle on one registered agent; its lease lives until ``close()``."""

    def __init__(self, keeper: LeaseKeeper, agent: Agent, key: str, lease_id: int) -> None:
        self._keeper = keeper
        self.agent = agent
        self.key = key
        self.lease_id = lease_id
        self.registered = True
        # Other keys that live and die with the agent (its A2A card), written under the same lease.
        self.attachments: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def attach(self, key: str, value: bytes | None) -> None:
        """Store ``key`` under this registration's lease (None removes it); rewritten after a lease loss."""
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

    async def update(self, agent: Agent) -> None:
        """Write a changed record (e.g. a health status) under the same lease.

        If etcd is unreachable the change is kept and written when the lease is
        renewed or the agent re-registered.
        """
        if agent.key(self._keeper.prefix) != self.key:
            raise ValueError("an update cannot change the agent's name or id")
        self.agent = agent
        try:
            await self._keeper.etcd.put(self.key, agent.to_bytes(), self.lease_id)
        except RegistryUnavailable:
            self.registered = False
            raise

    async def close(self) -> None:
        """Stop the keepalive and revoke the lease (the agent disappears at once)."""
        if self._closed:
            return
        self._closed = True
        self._keeper._forget(self)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
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

    def update(self, refresh_interval: float) -> None:
        """A new keepalive interval (0: a third of each TTL), used from each lease's next refresh."""
        self._refresh_interval = refresh_interval

    @property
    def registrations(self) -> dict[str, Registration]:
        """Owned registrations by etcd key."""
        return dict(self._registrations)

    async def register(self, agent: Agent) -> Registration:
        """Grant a lease of the agent's TTL, put the agent under it, keep it alive.

        Raises RegistryUnavailable when etcd cannot be reached. Registering a key
        this keeper already owns replaces that registration.
        """
        if not agent.register_time:
            agent = _stamped(agent)
        key = agent.key(self.prefix)
        started = time.perf_counter()
        try:
            lease_id = await self._write(agent, key)
        except (RegistryUnavailable, AgentExists):
            self._metrics.registrations.labels("error").inc()
            raise
        self._metrics.registration_seconds.observe(time.perf_counter() - started)
        self._metrics.registrations.labels("ok").inc()
        previous = self._registrations.get(key)
        registration = Registration(self, agent, key, lease_id)
        self._registrations[key] = registration
        self._metrics.owned_agents.set(len(self._registrations))
        if previous is not None:
            previous._closed = True
            if previous._task is not None:
                previous._task.cancel()
            if previous.lease_id != lease_id:
                asyncio.get_running_loop().create_task(self._revoke_quietly(previous.lease_id))
        registration._task = asyncio.get_running_loop().create_task(
            self._keepalive(registration), name=f"lease:{key}")
        return registration

    def find(self, agent_id: str) -> Registration | None:
        """The owned registration of the agent with this id, if any."""
        for registration in self._registrations.values():
            if registration.agent.id == agent_id:
                return registration
        return None

    async def close(self) -> None:
        """Revoke every owned lease (graceful shutdown)."""
        await asyncio.gather(*(r.close() for r in list(self._registrations.values())), return_exceptions=True)

    def _forget(self, registration: Registration) -> None:
        if self._registrations.get(registration.key) is registration:
            del self._registrations[registration.key]
            self._metrics.owned_agents.set(len(self._registrations))

    async def _write(self, agent: Agent, key: str) -> int:
        lease_id = await self.etcd.grant(max(2, math.ceil(agent.ttl)))
        # Ours to replace: a record under a lease this keeper holds; anyone else's is refused.
        mine = {r.lease_id for r in self._registrations.values()}
        try:
            await self.etcd.put_owned(key, agent.to_bytes(), lease_id, mine)
        except BaseException:
            await self._revoke_quietly(lease_id)
            raise
        return lease_id

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

    async def _keepalive(self, registration: Registration) -> None:
        interval = self._interval(registration.agent)
        # Spread the refreshes of agents registered in one burst.
        await asyncio.sleep(interval * random.uniform(0.5, 1.0))
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
