"""GET /v1/watch (SSE) on a real sidecar: order, resume with Last-Event-ID, RELIST, a stalled subscriber."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from sidecar.server import Server

from .etcd_process import EtcdProcess
from .sse import next_event
from .waiting import eventually

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]


def agent(i: int) -> dict:
    return {"id": f"w-{i}", "name": "watched", "address": "127.0.0.1", "port": 9000 + i,
            "capabilities": ["watch"], "ttl": "30s"}


def base(server: Server) -> str:
    assert server.admin.address is not None
    return "http://{}:{}".format(*server.admin.address)


async def register(http: aiohttp.ClientSession, server: Server, i: int) -> None:
    async with http.post(base(server) + "/v1/agents", json=agent(i)) as response:
        assert response.status == 201, await response.text()


async def test_resume_from_last_event_id_and_relist_after_compaction(private_etcd: EtcdProcess, make_server) -> None:
    server = await make_server(endpoint=private_etcd.endpoint)
    await eventually(lambda: server.catalog.synced)
    async with aiohttp.ClientSession() as http:
        await register(http, server, 1)
        await eventually(lambda: "w-1" in server.catalog.snapshot.by_id)  # a 201 comes before the watch event
        async with http.get(base(server) + "/v1/watch?capability=watch") as stream:
            kind, event_id, first = await next_event(stream)
            assert kind == "snapshot" and [a["id"] for a in first["agents"]] == ["w-1"]
            await register(http, server, 2)
            kind, event_id, change = await next_event(stream)
            assert kind == "upsert" and change["agent"]["id"] == "w-2"
            seen = event_id
        assert seen is not None
        # Missed while disconnected: one new agent, one deleted; then resume where the stream stopped.
        await register(http, server, 3)
        async with http.delete(base(server) + "/v1/agents/w-1") as response:
            assert response.status == 204
        await eventually(lambda: "w-1" not in server.catalog.snapshot.by_id)
        async with http.get(base(server) + "/v1/watch?capability=watch", headers={"Last-Event-ID": seen}) as stream:
            missed = [await next_event(stream) for _ in range(2)]
            assert [(k, d.get("agent", d).get("id")) for k, _, d in missed] == [("upsert", "w-3"), ("delete", "w-1")]
            assert all(int(i) > int(seen) for _, i, _ in missed), "ids are revisions, and only newer ones come"
        # A revision etcd has compacted away: RELIST, then a SNAPSHOT to start over from.
        await register(http, server, 4)
        await eventually(lambda: "w-4" in server.catalog.snapshot.by_id)
        revision = int(private_etcd.ctl("get", "x", "-w", "json").split('"revision":')[1].split(",")[0])
        private_etcd.ctl("compact", str(revision))
        async with http.get(base(server) + f"/v1/watch?capability=watch&from_revision={seen}") as stream:
            kind, _, _ = await next_event(stream)
            assert kind == "relist"
            kind, _, snapshot = await next_event(stream)
            assert kind == "snapshot" and sorted(a["id"] for a in snapshot["agents"]) == ["w-2", "w-3", "w-4"]
        async with http.get(base(server) + "/v1/watch", headers={"Last-Event-ID": "soon"}) as response:
            assert response.status == 400


async def test_a_stalled_subscriber_does_not_hold_up_another(make_server) -> None:
    server = await make_server()
    await eventually(lambda: server.catalog.synced)
    host, port = server.admin.address  # type: ignore[misc]
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((host, port))
    stalled.sendall(b"GET /v1/watch HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
    try:
        async with aiohttp.ClientSession() as http:
            await eventually(lambda: server.hub.subscribers == 1, what="the stalled subscriber")
            async with http.get(base(server) + "/v1/watch?capability=watch") as stream:
                kind, _, _ = await next_event(stream)
                assert kind == "snapshot"
                await asyncio.gather(*(register(http, server, i) for i in range(60)))
                ids = set()
                while len(ids) < 60:
                    kind, _, change = await next_event(stream)
                    assert kind == "upsert"
                    ids.add(change["agent"]["id"])
            async with http.get(base(server) + "/readyz") as response:
                assert response.status == 200, "the admin API still answers"
    finally:
        stalled.close()
