"""The SDK demo agent against the SDK client and raw JSON-RPC, directly (no sidecar in the path).

These pin what the proxy's A2A features are built on: the card the agent
serves, which method names and versions its endpoint accepts, and where task
and context ids appear in results and stream events (docs/a2a-wire.md).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from a2a.client import A2ACardResolver
from a2a.types import TaskState

from sidecar.cards import decode_card
from sidecar.demo_a2a import DemoA2AAgent

from .client import connect, replica_of, v03_message, v1_message, verify_demo_signature

pytestmark = [pytest.mark.a2a, pytest.mark.asyncio]

WORKING = (TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING)


async def test_card_parses_with_the_sdk_resolver_and_the_registry(a2a_agent: DemoA2AAgent) -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        card = await A2ACardResolver(http, a2a_agent.url).get_agent_card(signature_verifier=verify_demo_signature)
        response = await http.get(a2a_agent.url + "/.well-known/agent-card.json")
        legacy = await http.get(a2a_agent.url + "/.well-known/agent.json")
        unchanged = await http.get(a2a_agent.url + "/.well-known/agent-card.json",
                                   headers={"If-None-Match": response.headers["etag"]})
    assert [s.id for s in card.skills] == ["research"]
    assert [(i.url, i.protocol_binding, i.protocol_version) for i in card.supported_interfaces] == [
        (a2a_agent.url + "/", "JSONRPC", "1.0"), (a2a_agent.url + "/", "JSONRPC", "0.3")]
    assert len(card.signatures) == 1
    assert response.headers["content-type"] == "application/json"
    assert response.headers["etag"].startswith('W/"') and unchanged.status_code == 304
    raw = response.json()
    # The v0.3 fields the SDK adds beside the v1.0 ones: a proxy rewrites both.
    assert raw["url"] == a2a_agent.url + "/" and raw["protocolVersion"] == "0.3"
    assert raw["signatures"][0]["protected"]
    assert json.loads(a2a_agent.card_bytes) == raw == legacy.json()
    stored = decode_card(a2a_agent.card_bytes, "test")
    assert (stored.shape, stored.capabilities(), stored.url) == ("1.0", ("research",), a2a_agent.url + "/")


async def test_non_streaming_send_answers_with_the_replica(a2a_agent: DemoA2AAgent) -> None:
    async with connect(a2a_agent.url) as conn:
        pong = await conn.send("ping")
        answer = await conn.send("what is etcd?")
    assert conn.sent == ["SendMessage", "SendMessage"]
    assert pong.HasField("message") and pong.message.parts[0].text == "pong from research-1"
    assert replica_of(pong) == "research-1"
    assert answer.HasField("task") and answer.task.status.state == TaskState.TASK_STATE_COMPLETED
    assert [p.text for p in answer.task.artifacts[0].parts] == [
        f"chunk {n} from research-1: what is etcd?" for n in range(3)]
    assert replica_of(answer) == "research-1"


async def test_streaming_send_arrives_incrementally(a2a_agent: DemoA2AAgent) -> None:
    async with connect(a2a_agent.url) as conn, asyncio.timeout(20):
        kinds = [e.WhichOneof("payload") async for e in conn.stream("what is etcd?")]
        assert kinds == ["task", "status_update", "artifact_update", "artifact_update", "artifact_update",
                         "status_update"]
        # A slow task's stream cannot end before it is cancelled: what arrives first arrived incrementally.
        stream = conn.stream("slow")
        first = await anext(stream)
        working = await anext(stream)
        assert first.task.status.state == TaskState.TASK_STATE_SUBMITTED
        assert working.status_update.status.state == TaskState.TASK_STATE_WORKING
        assert replica_of(first) == replica_of(working) == "research-1"
        assert working.status_update.task_id == first.task.id
        cancelled = await conn.cancel_task(first.task.id)
        rest = [e async for e in stream]  # the stream ends once the task is cancelled
        assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
        assert all(e.WhichOneof("payload") == "status_update" for e in rest), rest


async def test_slow_task_polled_then_cancelled(a2a_agent: DemoA2AAgent) -> None:
    async with connect(a2a_agent.url) as conn:
        created = await conn.send("slow", return_immediately=True)
        task_id = created.task.id
        assert created.task.status.state in WORKING
        for _ in range(20):
            polled = await conn.get_task(task_id)
            assert polled.status.state in WORKING and replica_of(polled) == "research-1"
        cancelled = await conn.cancel_task(task_id)
        assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
        assert cancelled.status.message.parts[0].text == "cancelled by research-1"
        assert (await conn.get_task(task_id)).status.state == TaskState.TASK_STATE_CANCELED
        again = await conn.rpc("CancelTask", {"id": task_id})
    assert again["error"]["code"] == -32002  # TaskNotCancelable


async def test_sdk_client_speaks_v03_too(a2a_agent: DemoA2AAgent) -> None:
    async with connect(a2a_agent.url, protocol_version="0.3") as conn:
        pong = await conn.send("ping")
        kinds = [e.WhichOneof("payload") async for e in conn.stream("hi")]
    assert conn.sent == ["message/send", "message/stream"]
    assert replica_of(pong) == "research-1"
    assert kinds[0] == "task" and kinds[-1] == "status_update" and len(kinds) == 6


V1 = {"send": "SendMessage", "stream": "SendStreamingMessage", "get": "GetTask", "cancel": "CancelTask"}
V03 = {"send": "message/send", "stream": "message/stream", "get": "tasks/get", "cancel": "tasks/cancel"}


@pytest.mark.parametrize("names", [V1, V03], ids=["v1.0", "v0.3"])
async def test_raw_json_rpc_method_names(a2a_agent: DemoA2AAgent, names: dict[str, str]) -> None:
    v1 = names is V1
    slow = (v1_message("slow", contextId="ctx-raw") | {"configuration": {"returnImmediately": True}} if v1
            else v03_message("slow", contextId="ctx-raw", configuration={"blocking": False}))
    async with connect(a2a_agent.url) as conn:
        created = await conn.rpc(names["send"], slow, request_id="req-1")
        assert created["id"] == "req-1"
        task = created["result"]["task"] if v1 else created["result"]
        if not v1:
            assert task["kind"] == "task"
        assert task["contextId"] == "ctx-raw" and task["metadata"]["replica"] == "research-1"
        polled = await conn.rpc(names["get"], {"id": task["id"]})
        assert polled["result"]["id"] == task["id"] and polled["result"]["contextId"] == "ctx-raw"
        cancelled = await conn.rpc(names["cancel"], {"id": task["id"]})
        assert cancelled["result"]["status"]["state"] == ("TASK_STATE_CANCELED" if v1 else "canceled")
        missing = await conn.rpc(names["get"], {"id": "no-such-task"})
        assert missing["error"]["code"] == -32001  # TaskNotFound: what another replica answers

        params = v1_message("hi", contextId="ctx-stream") if v1 else v03_message("hi", contextId="ctx-stream")
        async with conn.rpc_stream(names["stream"], params, request_id=7) as (response, events):
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            seen = [e async for e in events]
    assert {e["id"] for e in seen} == {7}
    results = [e["result"] for e in seen]
    if v1:
        assert [next(iter(r)) for r in results] == ["task", "statusUpdate", "artifactUpdate", "artifactUpdate",
                                                    "artifactUpdate", "statusUpdate"]
        task_id = results[0]["task"]["id"]
        assert all(r[k]["taskId"] == task_id and r[k]["contextId"] == "ctx-stream"
                   for r in results[1:] for k in r)
    else:
        assert [r["kind"] for r in results] == ["task", "status-update", "artifact-update", "artifact-update",
                                                "artifact-update", "status-update"]
        task_id = results[0]["id"]
        assert all(r["taskId"] == task_id and r["contextId"] == "ctx-stream" for r in results[1:])
        assert results[-1]["final"] is True


async def test_version_header_decides_which_names_are_accepted(a2a_agent: DemoA2AAgent) -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        async def call(method: str, params: dict[str, object], headers: dict[str, str]) -> dict[str, object]:
            response = await http.post(a2a_agent.url + "/", headers=headers,
                                       json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
            return dict(response.json())

        assert "result" in await call("SendMessage", v1_message("ping"), {"A2A-Version": "1.0"})
        assert "result" in await call("message/send", v03_message("ping"), {})
        assert "result" in await call("message/send", v03_message("ping"), {"A2A-Version": "0.3"})
        no_header = await call("SendMessage", v1_message("ping"), {})
        assert no_header["error"]["code"] == -32009  # type: ignore[index]  # VersionNotSupported: read as 0.3
        assert "error" in await call("message/send", v03_message("ping"), {"A2A-Version": "1.0"})


async def test_tasks_live_on_their_replica(a2a_replicas: list[DemoA2AAgent]) -> None:
    first, second, _ = a2a_replicas
    async with connect(first.url) as one, connect(second.url) as two:
        created = await one.send("slow", return_immediately=True)
        elsewhere = await two.rpc("GetTask", {"id": created.task.id})
        assert elsewhere["error"]["code"] == -32001
        follow_up = await two.rpc("SendMessage", v1_message("ping", taskId=created.task.id))
        assert follow_up["error"]["code"] == -32001
        # A known context on another replica is not an error: the replica starts it afresh (turn 1).
        context = created.task.context_id
        here = await one.send("ping", context_id=context)
        there = await two.send("ping", context_id=context)
        assert (here.message.metadata["turn"], there.message.metadata["turn"]) == (2, 1)
        assert (replica_of(here), replica_of(there)) == ("research-1", "research-2")
        await one.cancel_task(created.task.id)
