"""Members added and removed while a sidecar runs: it learns the member list by itself and outlives the old ones."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest

from sidecar.registry.etcd import EtcdClient

from ..etcd_cluster import EtcdCluster, Member

pytestmark = [pytest.mark.etcd, pytest.mark.chaos, pytest.mark.asyncio]


def member_id(cluster: EtcdCluster, name: str) -> str:
    members = json.loads(cluster.ctl("member", "list", "-w", "json"))["members"]
    return next(format(m["ID"], "x") for m in members if m.get("name") == name)


# etcd's answers to a reconfiguration that may be asked again: a member connected for less than a few
# seconds, a new member not started yet, a leader lost or changed meanwhile (a removed leader steps down).
# "server stopped": the member asked was the one removed; it stops as it answers.
TRANSIENT = (b"unhealthy cluster", b"not enough started members", b"leader changed", b"no leader",
             b"request timed out", b"context deadline exceeded", b"server stopped")


def reconfigure(cluster: EtcdCluster, *args: str, endpoints: list[str] | None = None) -> None:
    """A member add/remove, asked again while etcd's answer says it may succeed later (for up to 30 s)."""
    deadline = time.monotonic() + 30
    asked = False
    while True:
        try:
            cluster.ctl("member", *args, endpoints=endpoints)
            return
        except subprocess.CalledProcessError as exc:
            if asked and args[0] == "remove" and b"member not found" in exc.stderr:
                return  # an earlier ask was carried out after all (its answer was lost to a leader change)
            asked = True
            if not any(reason in exc.stderr for reason in TRANSIENT) or time.monotonic() > deadline:
                raise AssertionError(f"etcdctl member {' '.join(args)}: {exc.stderr.decode(errors='replace')}") from exc
            time.sleep(0.5)


def add_member(cluster: EtcdCluster, name: str) -> Member:
    member = Member(name, cluster.dir)
    reconfigure(cluster, "add", name, f"--peer-urls={member.peer_url}")
    running = [m for m in cluster.members if m.running]
    member.start(cluster.initial_cluster([*running, member]), state="existing")
    cluster.members.append(member)
    return member


async def test_the_client_follows_the_member_list(cluster: EtcdCluster) -> None:
    client = EtcdClient([cluster.members[0].endpoint], timeout=5)
    try:
        await client.put("/m/k", b"0")
        for _ in range(100):
            if await client.sync_members():
                break
            await asyncio.sleep(0.1)
        assert sorted(client.endpoints) == sorted(cluster.endpoints), "the members it was not given are learnt"
        new = add_member(cluster, "m3")
        for _ in range(100):
            if await client.sync_members() or new.endpoint in client.endpoints:
                break
            await asyncio.sleep(0.1)
        assert new.endpoint in client.endpoints
        # Remove every original member; the client keeps working through the ones it learnt.
        for gone in ("m0", "m1"):
            member = next(m for m in cluster.members if m.name == gone)
            others = [m.endpoint for m in cluster.members if m.running and m is not member]
            reconfigure(cluster, "remove", member_id(cluster, gone), endpoints=others)  # not asked of itself
            member.kill()
            cluster.wait_for_leader()
            await client.sync_members()
        assert sorted(client.endpoints) == sorted(m.endpoint for m in cluster.members if m.running)
        await client.put("/m/k", b"1")
        stored = await client.get_at("/m/k")
        assert stored is not None and stored.value == b"1"
    finally:
        await client.close()
