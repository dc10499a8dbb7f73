"""A leader SIGKILL while the sidecar writes: no client retries, no lost or duplicated registration."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from ..conftest import sidecar_settings
from ..etcd_cluster import EtcdCluster
from ..waiting import eventually

pytestmark = [pytest.mark.etcd, pytest.mark.chaos, pytest.mark.asyncio]


async def test_a_write_during_an_election_succeeds_once_a_leader_exists(cluster: EtcdCluster, prefix: str) -> None:
    from sidecar.server import Server

    server = Server(sidecar_settings(cluster.endpoints[0], prefix,
                                     etcd={"endpoints": cluster.endpoints, "request_timeout": 5}))
    await server.start()
    try:
        await eventually(lambda: server.readiness()["ready"])
        url = "http://{}:{}".format(*server.admin.address)
        async with aiohttp.ClientSession() as http:
            leader = cluster.wait_for_leader()
            leader.kill()
            started = time.monotonic()
            results = []
            for i in range(5):
                body = {"id": f"e-{i}", "name": "elect", "address": "127.0.0.1", "port": 9000 + i,
                        "capabilities": ["elect"], "ttl": "10s"}
                async with http.post(url + "/v1/agents", json=body) as response:
                    results.append((response.status, await response.text()))
            took = time.monotonic() - started
            assert [status for status, _ in results] == [201] * 5, results
            assert took < 5 * 5, "each write finished within its request timeout"
            await eventually(lambda: len(server.catalog.snapshot.by_capability.get("elect", ())) == 5)
            stored = cluster.ctl("get", "--prefix", f"{prefix}/services/", "--keys-only").split()
            assert sorted(stored) == sorted(f"{prefix}/services/elect/e-{i}" for i in range(5))
            leases = cluster.ctl("lease", "list")
            assert leases.count("\n") - 1 <= 5 + 1, f"no orphan leases from retried grants: {leases}"
    finally:
        await asyncio.wait_for(server.stop(), 60)


async def test_writes_while_the_leader_is_frozen_succeed_within_the_request_timeout(cluster: EtcdCluster,
                                                                                    prefix: str) -> None:
    from sidecar.registry.etcd import EtcdClient

    client = EtcdClient(cluster.endpoints, timeout=5)
    try:
        for i in range(6):  # a connection to every member, and the leader among those written through
            await client.put(f"{prefix}/warm/{i}", b"x")
        leader = cluster.wait_for_leader()
        assert leader.process is not None
        refused: list[str] = []

        async def write(i: int) -> None:
            try:
                lease = await client.grant(10)
                await client.put(f"{prefix}/frozen/{i}", b"v", lease)
            except Exception as exc:  # what a registration would have answered 503 with
                refused.append(f"{i}: {exc}")

        leader.process.send_signal(signal.SIGSTOP)
        try:
            # Waves of writes: the first ones meet the frozen leader, later ones the election and the new leader.
            for wave in range(4):
                await asyncio.gather(*(write(10 * wave + i) for i in range(10)))
        finally:
            leader.process.send_signal(signal.SIGCONT)
        assert refused == [], refused
        stored = cluster.ctl("get", "--prefix", f"{prefix}/frozen/", "--keys-only").split()
        assert len(stored) == 40
    finally:
        await client.close()
