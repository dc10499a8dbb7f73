"""The admin API against a running sidecar on a real etcd."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from sidecar.server import Server

from .etcd_process import EtcdProcess
from .waiting import eventually

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]

AGENT = {"id": "chat-1", "name": "chat-agent", "address": "127.0.0.1", "port": 9001,
         "capabilities": ["chat"], "tags": ["gpu"], "ttl": "5s", "health": {"status": "healthy"}}


def base(server: Server) -> str:
    assert server.admin.address is not None
    host, port = server.admin.address
    return f"http://{host}:{port}"


async def test_health_ready_and_metrics(make_server) -> None:
    server = await make_server()
    async with aiohttp.ClientSession() as http:
        async with http.get(base(server) + "/healthz") as response:
            assert response.status == 200
        await eventually(lambda: server.readiness()["ready"] and server.sync.connected)
        async with http.get(base(server) + "/readyz") as response:
            body = await response.json()
            assert response.status == 200 and body["synced"] and body["etcd_connected"]
        async with http.get(base(server) + "/metrics") as response:
            text = await response.text()
            assert "sidecar_registry_snapshot_revision" in text
            assert "sidecar_registry_etcd_up 1.0" in text


async def test_register_list_filter_and_delete(make_server, etcd: EtcdProcess, prefix: str) -> None:
    server = await make_server()
    url = base(server)
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/agents", json=AGENT) as response:
            assert response.status == 201, await response.text()
            stored = await response.json()
            assert stored["ttl"] == 5_000_000_000 and stored["owned"] and stored["register_time"]
        async with http.post(url + "/v1/agents", json={**AGENT, "id": "chat-2", "tags": ["cpu"],
                                                        "health": {"status": "unhealthy"}}) as response:
            assert response.status == 201
        stored = json.loads(etcd.ctl("get", "--print-value-only", f"{prefix}/services/chat-agent/chat-1"))
        assert stored["id"] == "chat-1"
        await eventually(lambda: len(server.catalog.snapshot.agents) == 2)

        async def ids(query: str) -> list[str]:
            async with http.get(url + "/v1/agents" + query) as response:
                assert response.status == 200
                return [a["id"] for a in (await response.json())["agents"]]

        assert await ids("?capability=chat") == ["chat-1", "chat-2"]
        assert await ids("?capability=CHAT&tag=gpu") == ["chat-1"]
        assert await ids("?healthy=true") == ["chat-1"]
        assert await ids("?healthy=false") == ["chat-2"]
        assert await ids("?name=chat-agent&tag=gpu,cpu") == []
        async with http.get(url + "/v1/agents?healthy=maybe") as response:
            assert response.status == 400
        async with http.get(url + "/v1/agents/chat-1") as response:
            assert (await response.json())["tags"] == ["gpu"]

        async with http.delete(url + "/v1/agents/chat-1") as response:
            assert response.status == 204
        await eventually(lambda: "chat-1" not in server.catalog.snapshot.by_id)
        async with http.delete(url + "/v1/agents/chat-1") as response:
            assert response.status == 404
        # Not owned by this sidecar: deleted by key.
        etcd.ctl("put", f"{prefix}/services/other/x1", json.dumps({**AGENT, "id": "x1", "name": "other"}))
        await eventually(lambda: "x1" in server.catalog.snapshot.by_id)
        async with http.delete(url + "/v1/agents/x1") as response:
            assert response.status == 204
        await eventually(lambda: "x1" not in server.catalog.snapshot.by_id)


async def test_bad_registrations_name_each_field(make_server) -> None:
    server = await make_server()
    async with aiohttp.ClientSession() as http:
        bad = {"name": "", "address": "x y", "port": 0, "ttl": "1s", "capabilites": ["typo"]}
        async with http.post(base(server) + "/v1/agents", json=bad) as response:
            assert response.status == 400
            assert response.headers["x-sidecar-error"] == "invalid_agent"
            fields = {f["field"] for f in (await response.json())["fields"]}
            assert fields == {"name", "address", "port", "ttl", "capabilites"}
        async with http.post(base(server) + "/v1/agents", data=b"{nope") as response:
            assert response.status == 400 and (await response.json())["code"] == "bad_json"
    assert len(server.catalog.snapshot.agents) == 0


async def test_token_guards_mutations_only(make_server) -> None:
    server = await make_server(admin={"listen": "127.0.0.1:0", "token": "s3cret"})
    url = base(server)
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/agents", json=AGENT) as response:
            assert response.status == 401
        async with http.post(url + "/v1/agents", json=AGENT,
                             headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 401
        async with http.get(url + "/v1/agents") as response:
            assert response.status == 200
        async with http.post(url + "/v1/agents", json=AGENT,
                             headers={"Authorization": "Bearer s3cret"}) as response:
            assert response.status == 201


async def test_watch_streams_snapshot_then_changes(make_server) -> None:
    server = await make_server()
    url = base(server)
    await eventually(lambda: server.catalog.synced)
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/v1/watch") as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")

            async def next_event() -> tuple[str, dict]:
                kind, data = "", ""
                while True:
                    line = (await asyncio.wait_for(stream.content.readline(), 20)).decode().rstrip("\n")
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif line == "" and kind:
                        return kind, json.loads(data)

            kind, first = await next_event()
            assert kind == "snapshot" and first["agents"] == []
            async with http.post(url + "/v1/agents", json=AGENT) as response:
                assert response.status == 201
            kind, change = await next_event()
            assert kind == "upsert" and change["agent"]["id"] == "chat-1"
            async with http.delete(url + "/v1/agents/chat-1") as response:
                assert response.status == 204
            kind, change = await next_event()
            assert kind == "delete" and change["key"].endswith("/services/chat-agent/chat-1")


async def test_serves_last_snapshot_while_etcd_is_down(private_etcd: EtcdProcess, make_server) -> None:
    server = await make_server(endpoint=private_etcd.endpoint)
    url = base(server)
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/agents", json={**AGENT, "ttl": "30s"}) as response:
            assert response.status == 201
        await eventually(lambda: "chat-1" in server.catalog.snapshot.by_id)
        private_etcd.stop()
        await eventually(lambda: not server.sync.connected)
        async with http.get(url + "/readyz") as response:
            body = await response.json()
            assert response.status == 200 and body["stale_since"] and not body["etcd_connected"]
        async with http.get(url + "/v1/agents?capability=chat") as response:
            assert [a["id"] for a in (await response.json())["agents"]] == ["chat-1"]
        async with http.get(url + "/metrics") as response:
            assert "sidecar_registry_etcd_up 0.0" in await response.text()


async def test_a_registration_while_etcd_is_down_is_pending_then_written(private_etcd: EtcdProcess,
                                                                         make_server) -> None:
    server = await make_server(endpoint=private_etcd.endpoint)
    url = base(server)
    await eventually(lambda: server.readiness()["ready"])
    private_etcd.stop()
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/agents", json={**AGENT, "id": "chat-9"}) as response:
            body = await response.json()
            assert response.status == 202 and body["state"] == "pending" and body["id"] == "chat-9", body
        async with http.post(url + "/v1/agents", json={**AGENT, "id": "chat-10"}) as response:
            assert response.status == 202
        async with http.get(url + "/v1/agents?capability=chat") as response:
            listed = await response.json()
            assert listed["agents"] == [] and sorted(a["id"] for a in listed["pending"]) == ["chat-10", "chat-9"]
            assert {a["state"] for a in listed["pending"]} == {"pending"}
        async with http.get(url + "/v1/agents?capability=other") as response:
            assert (await response.json())["pending"] == [], "the query filters pending registrations too"
        async with http.get(url + "/v1/agents/chat-9") as response:
            assert response.status == 200 and (await response.json())["state"] == "pending"
        async with http.get(url + "/metrics") as response:
            assert "sidecar_registry_pending_registrations 2.0" in await response.text()
        # A DELETE cancels a pending registration: it is never written.
        async with http.delete(url + "/v1/agents/chat-10") as response:
            assert response.status == 204
        async with http.get(url + "/v1/agents/chat-10") as response:
            assert response.status == 404
        private_etcd.start()
        await eventually(lambda: "chat-9" in server.catalog.snapshot.by_id, timeout=30)
        async with http.get(url + "/v1/agents/chat-9") as response:
            body = await response.json()
            assert response.status == 200 and "state" not in body and body["owned"]
        async with http.get(url + "/v1/agents?capability=chat") as response:
            listed = await response.json()
            assert [a["id"] for a in listed["agents"]] == ["chat-9"] and listed["pending"] == []
        async with http.post(url + "/v1/agents", json={**AGENT, "id": "chat-11"}) as response:
            assert response.status == 201 and (await response.json())["state"] == "registered"
        async with http.get(url + "/metrics") as response:
            text = await response.text()
        assert "sidecar_registry_pending_registrations 0.0" in text
        assert 'sidecar_registry_pending_resolved_total{outcome="registered"} 1.0' in text
        assert 'sidecar_registry_pending_resolved_total{outcome="cancelled"} 1.0' in text
        assert "chat-10" not in private_etcd.ctl("get", "--prefix", "/", "--keys-only")


async def test_not_ready_until_the_first_sync(private_etcd: EtcdProcess, make_server) -> None:
    private_etcd.stop()
    server = await make_server(endpoint=private_etcd.endpoint)
    async with aiohttp.ClientSession() as http:
        async with http.get(base(server) + "/readyz") as response:
            body = await response.json()
            assert response.status == 503 and not body["synced"] and body["listeners"]
        async with http.get(base(server) + "/healthz") as response:
            assert response.status == 200
        private_etcd.start()
        await eventually(lambda: server.readiness()["ready"], timeout=30)
        async with http.get(base(server) + "/readyz") as response:
            assert response.status == 200
