"""The official A2A SDK client through the sidecar's proxy to three SDK replicas: cards, tasks and contexts stay put."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from google.protobuf.json_format import MessageToDict

from sidecar.demo_a2a import DemoA2AAgent
from sidecar.server import Server

from ..waiting import eventually
from .client import connect, replica_of, v03_message, v1_message

pytestmark = [pytest.mark.a2a, pytest.mark.etcd, pytest.mark.asyncio]
BASE = "http://research.agents.local"


def proxy_of(server: Server) -> str:
    assert server.proxy.address is not None
    return "http://{}:{}".format(*server.proxy.address)


async def test_the_card_comes_from_the_registry_rewritten_to_the_in_zone_name(
        registered_replicas: tuple[Server, list[DemoA2AAgent]]) -> None:
    server, _ = registered_replicas
    async with httpx.AsyncClient(proxy=proxy_of(server), trust_env=False) as http:
        for path in ("/.well-known/agent-card.json", "/.well-known/agent.json"):
            response = await http.get(BASE + path)
            card = response.json()
            assert response.status_code == 200 and response.headers["x-sidecar-agent"].startswith("research-")
            assert {i["url"] for i in card["supportedInterfaces"]} == {BASE + "/"} and card["url"] == BASE + "/"
            assert "signatures" not in card
    assert server.metrics.proxy.a2a["card_served"] == 2


async def test_a_task_is_polled_and_cancelled_on_the_replica_that_created_it(
        registered_replicas: tuple[Server, list[DemoA2AAgent]]) -> None:
    server, _ = registered_replicas
    async with connect(BASE, proxy=proxy_of(server), verify_signature=False) as conn:
        result = await conn.send("slow please", return_immediately=True)
        task = result.task
        owner = replica_of(result)
        assert task.id and owner.startswith("research-")
        for _ in range(20):
            polled = await conn.get_task(task.id)
            assert polled.id == task.id and replica_of(polled) == owner
        cancelled = await conn.cancel_task(task.id)
        assert replica_of(cancelled) == owner
        assert MessageToDict(cancelled)["status"]["state"] == "TASK_STATE_CANCELED"
        assert conn.sent.count("GetTask") == 20
    assert server.metrics.proxy.a2a["hit"] >= 21


async def test_a_streamed_answer_arrives_as_it_is_made_and_teaches_the_owner(
        registered_replicas: tuple[Server, list[DemoA2AAgent]]) -> None:
    server, _ = registered_replicas
    async with connect(BASE, proxy=proxy_of(server), verify_signature=False) as conn:
        stream = conn.stream("slow stream")
        first = await asyncio.wait_for(anext(stream), 10)
        task_id = first.task.id
        owner = replica_of(first)
        second = await asyncio.wait_for(anext(stream), 10)  # arrives while the task still runs: not buffered
        assert second.WhichOneof("payload") in ("status_update", "artifact_update")
        polled = await conn.get_task(task_id)  # learnt from the stream's first event
        assert replica_of(polled) == owner
        await conn.cancel_task(task_id)
        await stream.aclose()


async def test_a_contexts_messages_stay_on_one_replica(registered_replicas: tuple[Server, list[DemoA2AAgent]]) -> None:
    server, _ = registered_replicas
    async with connect(BASE, proxy=proxy_of(server), verify_signature=False) as conn:
        first = await conn.send("ping")
        context_id = first.message.context_id
        owner = replica_of(first)
        for _ in range(6):
            reply = await conn.send("ping", context_id=context_id)
            assert replica_of(reply) == owner and reply.message.context_id == context_id


async def test_v03_method_names_are_routed_too(registered_replicas: tuple[Server, list[DemoA2AAgent]]) -> None:
    server, _ = registered_replicas
    async with httpx.AsyncClient(proxy=proxy_of(server), trust_env=False, timeout=10) as http:
        async def rpc(method: str, params: dict) -> dict:
            body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
            response = await http.post(BASE + "/", json=body, headers={"A2A-Version": "0.3"})
            return response.json()

        created = (await rpc("message/send", v03_message("slow v03", configuration={"blocking": False})))["result"]
        owner = replica_of(created)
        for _ in range(5):
            assert replica_of((await rpc("tasks/get", {"id": created["id"]}))["result"]) == owner
        assert replica_of((await rpc("tasks/cancel", {"id": created["id"]}))["result"]) == owner
        v1 = await http.post(BASE + "/", json={"jsonrpc": "2.0", "id": 2, "method": "SendMessage",
                                                "params": v1_message("ping")}, headers={"A2A-Version": "1.0"})
        assert v1.json()["result"]["message"]["contextId"]


async def test_when_the_owner_is_gone_the_answer_is_503_never_another_replica(
        registered_replicas: tuple[Server, list[DemoA2AAgent]]) -> None:
    server, _ = registered_replicas
    async with connect(BASE, proxy=proxy_of(server), verify_signature=False) as conn:
        result = await conn.send("slow gone", return_immediately=True)
        owner = replica_of(result)
        registration = server.leases.find(owner)
        assert registration is not None
        await registration.close()
        await eventually(lambda: owner not in server.catalog.snapshot.by_id)
        response = await conn.http.post(BASE + "/", headers={"A2A-Version": "1.0"}, json={
            "jsonrpc": "2.0", "id": 9, "method": "GetTask", "params": {"id": result.task.id}})
        assert response.status_code == 503
        assert response.headers["x-sidecar-error"] == "task_owner_unavailable"
    assert server.metrics.proxy.a2a["owner_gone"] == 1


async def test_plain_requests_are_relayed_as_before(registered_replicas: tuple[Server, list[DemoA2AAgent]]) -> None:
    server, _ = registered_replicas
    async with httpx.AsyncClient(proxy=proxy_of(server), trust_env=False, timeout=10) as http:
        response = await http.post(BASE + "/", content=b"not json", headers={"content-type": "text/plain"})
        assert response.status_code < 500 and response.headers["x-sidecar-agent"].startswith("research-")
        response = await http.post(BASE + "/", json={"no": "rpc"})
        assert response.status_code < 500


async def test_a_card_the_registry_does_not_hold_is_read_from_the_agent_and_rewritten(
        make_server, a2a_agent: DemoA2AAgent) -> None:
    server = await make_server()
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.post("http://{}:{}/v1/agents".format(*server.admin.address), json={
            "id": "plain-1", "name": "plain", "address": "127.0.0.1", "port": a2a_agent.port,
            "capabilities": ["plain"], "ttl": "10s"})
        assert response.status_code == 201
    await eventually(lambda: "plain-1" in server.catalog.snapshot.by_id)
    assert server.cards.of("plain", "plain-1") is None, "registered without a card"
    async with httpx.AsyncClient(proxy=proxy_of(server), trust_env=False) as http:
        response = await http.get("http://plain.agents.local/.well-known/agent-card.json")
        card = response.json()
    assert response.status_code == 200 and response.headers["x-sidecar-agent"] == "plain-1"
    assert {i["url"] for i in card["supportedInterfaces"]} == {"http://plain.agents.local/"}
    assert "signatures" not in card and card["skills"][0]["id"] == "research"
    assert server.metrics.proxy.a2a["card_fetched"] == 1
