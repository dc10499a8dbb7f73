"""Pending registrations: accepted while etcd cannot be reached, written (once, safely) when it answers.

The keeper reaches etcd through a relay that freezes (a SIGSTOPped etcd, as far as
the keeper can tell) while another owner still reaches etcd directly.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import pytest

from sidecar.errors import RegistryUnavailable
from sidecar.metrics import Metrics
from sidecar.registry.etcd import EtcdClient
from sidecar.registry.lease import LeaseKeeper

from ..etcd_process import EtcdProcess
from ..waiting import eventually
from .relay import Relay
from .test_etcd_registry import agent

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]


class Keeper:
    """A LeaseKeeper behind a freezable relay, and a direct client for looking (and competing)."""

    def __init__(self, etcd: EtcdProcess, prefix: str) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.metrics = Metrics()

    async def __aenter__(self) -> Keeper:
        port = urlsplit(self.etcd.endpoint).port
        assert port is not None
        self.relay = await Relay(port).start()
        self.client = EtcdClient([self.relay.endpoint], timeout=1)
        self.keeper = LeaseKeeper(self.client, self.prefix, self.metrics.registry)
        self.direct = EtcdClient([self.etcd.endpoint], timeout=5)
        await self.client.get("/warm")  # connected before the freeze
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.relay.thaw()
        await self.keeper.close()
        await self.client.close()
        await self.direct.close()
        await self.relay.close()

    def resolved(self, outcome: str) -> float:
        return self.metrics.registry.pending_resolved.labels(outcome)._value.get()


async def test_a_pending_registration_is_written_when_etcd_answers(etcd: EtcdProcess, prefix: str) -> None:
    async with Keeper(etcd, prefix) as k:
        k.relay.freeze()
        with pytest.raises(RegistryUnavailable):
            await k.keeper.register(agent("refused"))  # without keep_pending: refused, as before
        registration = await k.keeper.register(agent("p1", ttl="10s"), keep_pending=True)
        assert registration.pending and registration.state == "pending"
        assert list(k.keeper.pending) == [registration.key] and not k.keeper.registrations
        assert k.metrics.registry.pending_registrations._value.get() == 1
        k.relay.thaw()
        await eventually(lambda: not registration.pending, timeout=20, what="the pending registration written")
        stored = await k.direct.get(registration.key)
        assert stored is not None and stored.lease == registration.lease_id
        assert k.keeper.registrations == {registration.key: registration} and not k.keeper.pending
        assert k.resolved("registered") == 1 and k.metrics.registry.pending_registrations._value.get() == 0
        assert await k.direct.get(agent("refused").key(prefix)) is None


async def test_a_write_that_landed_unseen_is_recognised_as_its_own(etcd: EtcdProcess, prefix: str) -> None:
    # An attempt whose grant and put reached etcd while the answers were lost: the record is
    # there under the registration's lease id. The retry grants that same id and finds it its own.
    async with Keeper(etcd, prefix) as k:
        k.relay.freeze()
        registration = await k.keeper.register(agent("p2", ttl="10s"), keep_pending=True)
        assert registration.pending
        await k.direct.grant(10, registration.lease_id)
        await k.direct.put(registration.key, registration.agent.to_bytes(), registration.lease_id)
        k.relay.thaw()
        await eventually(lambda: not registration.pending, timeout=20)
        assert k.resolved("registered") == 1 and k.resolved("conflict") == 0
        stored = await k.direct.get(registration.key)
        assert stored is not None and stored.lease == registration.lease_id


async def test_an_id_taken_meanwhile_by_another_owner_drops_the_pending_registration(
        etcd: EtcdProcess, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    async with Keeper(etcd, prefix) as k:
        k.relay.freeze()
        registration = await k.keeper.register(agent("p3", ttl="10s"), keep_pending=True)
        other = await k.direct.grant(10)
        await k.direct.put(registration.key, b'{"taken": true}', other)
        with caplog.at_level(logging.WARNING, logger="sidecar.registry.lease"):
            k.relay.thaw()
            await eventually(lambda: not k.keeper.pending, timeout=20)
        assert k.resolved("conflict") == 1 and not k.keeper.registrations
        assert any("another owner registered this id" in r.getMessage() for r in caplog.records)
        stored = await k.direct.get(registration.key)
        assert stored is not None and stored.lease == other and stored.value == b'{"taken": true}'


async def test_closing_a_pending_registration_cancels_it(etcd: EtcdProcess, prefix: str) -> None:
    async with Keeper(etcd, prefix) as k:
        k.relay.freeze()
        cancelled = await k.keeper.register(agent("p4", ttl="10s"), keep_pending=True)
        kept = await k.keeper.register(agent("p5", ttl="10s"), keep_pending=True)
        await cancelled.close()
        assert list(k.keeper.pending) == [kept.key] and k.resolved("cancelled") == 1
        k.relay.thaw()
        # Written after the cancelled one would have been (the oldest pending goes first).
        await eventually(lambda: not kept.pending, timeout=20)
        assert await k.direct.get(cancelled.key) is None
        assert await k.direct.get(kept.key) is not None
