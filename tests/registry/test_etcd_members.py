"""The client's choice of member per attempt: steering around a frozen member, hedging a slow one."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest

from sidecar.registry.etcd import EtcdClient

from ..etcd_process import EtcdProcess
from .relay import Relay

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]


def port_of(endpoint: str) -> int:
    port = urlsplit(endpoint).port
    assert port is not None
    return port


async def test_writes_go_around_a_frozen_member_within_the_timeout(etcd: EtcdProcess, prefix: str) -> None:
    relays = [await Relay(port_of(etcd.endpoint)).start() for _ in range(3)]
    client = EtcdClient([r.endpoint for r in relays], timeout=3)
    try:
        await client.put(f"{prefix}/warm", b"x")
        # Freeze the member the client prefers (the one that answered): its connection stays open and silent.
        preferred = next(r for r in relays if r.connections)
        preferred.freeze()
        results = await asyncio.gather(*(client.put(f"{prefix}/k{i}", b"v") for i in range(20)),
                                       return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        # Later calls start on a member that answers: the frozen one is suspect, not tried first again.
        before = preferred.connections
        for i in range(10):
            await client.grant(10)
            await client.get(f"{prefix}/k{i}")
        assert preferred.connections == before
        assert sum(r.connections for r in relays if r is not preferred) >= 1
    finally:
        preferred.thaw()
        await client.close()
        for relay in relays:
            await relay.close()


async def test_a_slow_answer_is_not_cut_short_by_the_attempt_timeout(etcd: EtcdProcess, prefix: str) -> None:
    # Every member answers after 1.5 s, more than an attempt's third of the 3 s deadline (1 s):
    # the first attempt keeps running while another is sent, and its answer is taken.
    relays = [await Relay(port_of(etcd.endpoint)).start() for _ in range(2)]
    client = EtcdClient([r.endpoint for r in relays], timeout=3)
    try:
        await client.put(f"{prefix}/big", b"x" * 100_000)
        for relay in relays:
            relay.delay = 1.5
        revision, found = await client.get_prefix(f"{prefix}/")
        assert revision > 0 and [kv.key for kv in found] == [f"{prefix}/big"]
    finally:
        await client.close()
        for relay in relays:
            await relay.close()
