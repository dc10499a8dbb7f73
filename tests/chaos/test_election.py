"""A leader SIGKILL while the sidecar writes: no client retries, no lost or duplicated registration."""

from __future__ import annotations

import asyncio
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
