"""The gRPC API against a running sidecar on a real etcd, with real grpc.aio clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar.grpc_gen import discovery_pb2 as pb
from sidecar.grpc_gen import discovery_pb2_grpc as pb_grpc
from sidecar.server import Server

from .conftest import sidecar_settings
from .etcd_process import EtcdProcess
from .waiting import eventually

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]

# Generous bounds that only turn a hang into a failure; nothing is timed.
_WAIT = 20.0


def agent(agent_id: str, name: str = "chat-agent", **fields: Any) -> dict[str, Any]:
    return {"id": agent_id, "name": name, "address": "127.0.0.1", "port": 9001, "capabilities": ["chat"],
            "tags": ["gpu"], "health": {"status": "healthy"}, **fields}


def as_json(message: pb.Agent) -> dict[str, Any]:
    """The agent JSON a message carries, written out field by field (independent of the server's mapping)."""
    health = message.health
    return {"id": message.id, "name": message.name, "version": message.version, "address": message.address,
            "port": message.port, "protocol": message.protocol, "tags": list(message.tags),
            "metadata": dict(message.metadata),
            "health": {"type": health.type, "url": health.url, "interval": health.interval,
                       "timeout": health.timeout, "status": health.status},
            "capabilities": list(message.capabilities), "register_time": message.register_time,
            "ttl": message.ttl, "weight": message.weight, "zone": message.zone}


def put(etcd: EtcdProcess, key: str, value: dict[str, Any]) -> int:
    """Write a value with etcdctl; returns the revision of the write."""
    return int(json.loads(etcd.ctl("put", key, json.dumps(value), "-w", "json"))["header"]["revision"])


def delete(etcd: EtcdProcess, key: str) -> int:
    return int(json.loads(etcd.ctl("del", key, "-w", "json"))["header"]["revision"])


def target(server: Server) -> str:
    assert server.grpc.address is not None
    return "{}:{}".format(*server.grpc.address)


@pytest_asyncio.fixture
async def channel_to() -> AsyncIterator[Any]:
    """``channel_to(server)`` opens a grpc.aio channel to the server's gRPC API; all are closed after."""
    channels: list[grpc.aio.Channel] = []

    def open_channel(server: Server) -> grpc.aio.Channel:
        channels.append(grpc.aio.insecure_channel(target(server)))
        return channels[-1]

    yield open_channel
    for channel in channels:
        await channel.close()


class Stream:
    """A Watch call read event by event, each read bounded."""

    def __init__(self, stub: pb_grpc.DiscoveryStub, request: pb.WatchRequest) -> None:
        self.call = stub.Watch(request)

    async def next(self) -> pb.WatchEvent:
        event = await asyncio.wait_for(self.call.read(), _WAIT)
        assert event is not grpc.aio.EOF, "the stream ended"
        return event

    async def expect(self, kind: int, revision: int | None = None) -> pb.WatchEvent:
        event = await self.next()
        assert (event.type, event.revision if revision is not None else None) == (kind, revision), event
        return event


async def synced(server: Server) -> None:
    await eventually(lambda: server.catalog.synced, what="the first snapshot")


async def test_discover_answers_as_get_agents(make_server, etcd: EtcdProcess, prefix: str, channel_to) -> None:
    server = await make_server()
    put(etcd, f"{prefix}/services/chat-agent/chat-1", agent("chat-1", metadata={"region": "eu"}, zone="eu-1",
                                                           version="1.2", ttl="30s", weight=0))
    put(etcd, f"{prefix}/services/chat-agent/chat-2",
        agent("chat-2", tags=["cpu"], health={"status": "unhealthy", "type": "http", "url": "http://x/h",
                                              "interval": "2s", "timeout": 1_000_000_000}))
    last = put(etcd, f"{prefix}/services/other/plan-1", agent("plan-1", "other", capabilities=["plan"], tags=[]))
    await eventually(lambda: server.catalog.snapshot.revision >= last)
    stub = pb_grpc.DiscoveryStub(channel_to(server))
    admin_host, admin_port = server.admin.address
    cases = [
        ({}, ""),
        ({"capability": "chat"}, "capability=chat"),
        ({"capability": "CHAT", "tags": ["gpu"]}, "capability=CHAT&tag=gpu"),
        ({"tags": ["gpu,cpu"]}, "tag=gpu,cpu"),
        ({"name": "other"}, "name=other"),
        ({"id": "chat-2"}, "id=chat-2"),
        ({"healthy_only": True}, "healthy=true"),
        ({"capability": "nothing"}, "capability=nothing"),
    ]
    async with aiohttp.ClientSession() as http:
        for request, query in cases:
            async with http.get(f"http://{admin_host}:{admin_port}/v1/agents?{query}") as response:
                rest = await response.json()
            answer = await stub.Discover(pb.DiscoverRequest(**request))
            documents = [{k: v for k, v in a.items() if k not in ("key", "owned", "breaker")} for a in rest["agents"]]
            assert answer.revision == rest["revision"] >= last, request
            assert [as_json(a) for a in answer.agents] == documents, request
    assert [a.id for a in (await stub.Discover(pb.DiscoverRequest(capability="chat"))).agents] == ["chat-1", "chat-2"]
    one = (await stub.Discover(pb.DiscoverRequest(id="chat-1"))).agents[0]
    assert (one.weight, one.ttl, dict(one.metadata), one.zone) == (0, 30_000_000_000, {"region": "eu"}, "eu-1")


async def test_watch_sends_snapshot_then_each_change_in_order(make_server, etcd: EtcdProcess, prefix: str,
                                                              channel_to) -> None:
    server = await make_server()
    key1, key2 = f"{prefix}/services/chat-agent/chat-1", f"{prefix}/services/chat-agent/chat-2"
    first = put(etcd, key1, agent("chat-1"))
    await eventually(lambda: server.catalog.snapshot.revision >= first)
    stub = pb_grpc.DiscoveryStub(channel_to(server))
    stream = Stream(stub, pb.WatchRequest(capability="chat"))
    snapshot = await stream.next()
    assert snapshot.type == pb.WatchEvent.SNAPSHOT and [a.id for a in snapshot.agents] == ["chat-1"]
    revisions = [put(etcd, key2, agent("chat-2")), put(etcd, key1, agent("chat-1", version="2")),
                 put(etcd, key2, agent("chat-2", capabilities=["plan"])),  # leaves the selection: DELETE
                 delete(etcd, key1),
                 put(etcd, f"{prefix}/services/other/plan-9", agent("plan-9", "other", capabilities=["plan"]))]
    assert (await stream.expect(pb.WatchEvent.UPSERT, revisions[0])).agents[0].id == "chat-2"
    assert (await stream.expect(pb.WatchEvent.UPSERT, revisions[1])).agents[0].version == "2"
    assert (await stream.expect(pb.WatchEvent.DELETE, revisions[2])).agents[0].id == "chat-2"
    assert (await stream.expect(pb.WatchEvent.DELETE, revisions[3])).agents[0].id == "chat-1"
    # The change outside the selection is not sent: the next event is the next matching change.
    again = put(etcd, key1, agent("chat-1", version="3"))
    assert (await stream.expect(pb.WatchEvent.UPSERT, again)).agents[0].version == "3"
    stream.call.cancel()
    await eventually(lambda: server.hub.subscribers == 0, what="the cancelled stream's subscription closed")


async def test_watch_resumes_with_exactly_the_missed_changes(make_server, etcd: EtcdProcess, prefix: str,
                                                             channel_to) -> None:
    server = await make_server()
    key1, key2 = f"{prefix}/services/chat-agent/chat-1", f"{prefix}/services/chat-agent/chat-2"
    await synced(server)
    stub = pb_grpc.DiscoveryStub(channel_to(server))
    stream = Stream(stub, pb.WatchRequest(capability="chat"))
    await stream.expect(pb.WatchEvent.SNAPSHOT, server.catalog.snapshot.revision)
    seen = put(etcd, key1, agent("chat-1"))
    await stream.expect(pb.WatchEvent.UPSERT, seen)
    stream.call.cancel()
    # While the client is away:
    missed = [put(etcd, key2, agent("chat-2")), delete(etcd, key1)]
    await eventually(lambda: server.catalog.snapshot.revision >= missed[-1])
    resumed = Stream(stub, pb.WatchRequest(capability="chat", from_revision=seen))
    upsert = await resumed.expect(pb.WatchEvent.UPSERT, missed[0])
    assert [a.id for a in upsert.agents] == ["chat-2"]
    assert [a.id for a in (await resumed.expect(pb.WatchEvent.DELETE, missed[1])).agents] == ["chat-1"]
    live = put(etcd, key2, agent("chat-2", version="2"))
    await resumed.expect(pb.WatchEvent.UPSERT, live)
    # Resuming from the present sends nothing until the next change.
    current = Stream(stub, pb.WatchRequest(capability="chat", from_revision=live))
    later = delete(etcd, key2)
    await current.expect(pb.WatchEvent.DELETE, later)


async def test_watch_says_relist_after_compaction(private_etcd: EtcdProcess, make_server, prefix: str,
                                                  channel_to) -> None:
    server = await make_server(endpoint=private_etcd.endpoint)
    await synced(server)
    stub = pb_grpc.DiscoveryStub(channel_to(server))
    stream = Stream(stub, pb.WatchRequest())
    old = (await stream.expect(pb.WatchEvent.SNAPSHOT, server.catalog.snapshot.revision)).revision
    stream.call.cancel()
    put(private_etcd, f"{prefix}/services/chat-agent/chat-1", agent("chat-1"))
    latest = put(private_etcd, f"{prefix}/services/chat-agent/chat-2", agent("chat-2"))
    private_etcd.ctl("compact", str(latest))
    await eventually(lambda: server.catalog.snapshot.revision >= latest)
    resumed = Stream(stub, pb.WatchRequest(from_revision=old))
    await resumed.expect(pb.WatchEvent.RELIST)
    snapshot = await resumed.expect(pb.WatchEvent.SNAPSHOT, latest)
    assert sorted(a.id for a in snapshot.agents) == ["chat-1", "chat-2"]


async def test_register_and_deregister_need_the_token(make_server, etcd: EtcdProcess, prefix: str,
                                                      channel_to) -> None:
    server = await make_server(admin={"listen": "127.0.0.1:0", "token": "s3cret"})
    stub = pb_grpc.DiscoveryStub(channel_to(server))
    request = pb.Agent(name="chat-agent", id="chat-1", address="127.0.0.1", port=9001, capabilities=["chat"],
                       ttl=5_000_000_000)
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Register(request, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await stub.Discover(pb.DiscoverRequest())).agents == []  # reads need no token
    good = (("authorization", "Bearer s3cret"),)
    stored = await stub.Register(request, metadata=good)
    assert (stored.id, stored.ttl, stored.weight, stored.protocol) == ("chat-1", 5_000_000_000, 100, "http")
    assert stored.register_time and stored.health.status == "unknown"
    assert json.loads(etcd.ctl("get", "--print-value-only", f"{prefix}/services/chat-agent/chat-1"))["id"] == "chat-1"
    assert f"{prefix}/services/chat-agent/chat-1" in server.leases.registrations
    generated = await stub.Register(pb.Agent(name="chat-agent", address="127.0.0.1", port=9002), metadata=good)
    assert generated.id.startswith("chat-agent-") and generated.ttl == 10_000_000_000

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Deregister(pb.DeregisterRequest(id="chat-1"))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await stub.Deregister(pb.DeregisterRequest(id="chat-1"), metadata=good)
    await eventually(lambda: "chat-1" not in server.catalog.snapshot.by_id)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Deregister(pb.DeregisterRequest(id="chat-1"), metadata=good)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "chat-1" in missing.value.details()

    # The token is live: a new admin section takes effect at once, as for the admin API.
    old = server.settings
    server.apply(old, replace(old, admin=replace(old.admin, token="rotated")))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Deregister(pb.DeregisterRequest(id=generated.id), metadata=good)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await stub.Deregister(pb.DeregisterRequest(id=generated.id), metadata=(("authorization", "Bearer rotated"),))

    calls = server.metrics.discovery.grpc_requests
    assert calls.labels("Register", "UNAUTHENTICATED")._value.get() == 2
    assert calls.labels("Register", "OK")._value.get() == 2
    assert calls.labels("Deregister", "NOT_FOUND")._value.get() == 1


async def test_invalid_arguments_name_the_field(make_server, channel_to) -> None:
    server = await make_server()
    stub = pb_grpc.DiscoveryStub(channel_to(server))
    bad = pb.Agent(name="chat-agent", address="x y", port=0, capabilities=["service"], ttl=1_000_000_000,
                   health=pb.Health(status="great"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Register(bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details()
    for field in ("address:", "port:", "capabilities:", "ttl:", "health.status:"):
        assert field in details, (field, details)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Register(pb.Agent(address="127.0.0.1", port=80))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name:" in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Deregister(pb.DeregisterRequest())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "id:" in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Watch(pb.WatchRequest(from_revision=-1)).read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "from_revision" in refused.value.details()
    assert len(server.catalog.snapshot.agents) == 0 and not server.leases.registrations


async def test_register_while_etcd_is_down_is_kept_pending_and_written_later(private_etcd: EtcdProcess, make_server,
                                                                              channel_to) -> None:
    server = await make_server(endpoint=private_etcd.endpoint)
    await synced(server)
    private_etcd.stop()
    stub = pb_grpc.DiscoveryStub(channel_to(server))
    answer = await stub.Register(pb.Agent(id="late-1", name="chat-agent", address="127.0.0.1", port=9001))
    assert answer.pending and answer.id == "late-1"
    assert [r.agent.id for r in server.leases.pending.values()] == ["late-1"]
    assert not (await stub.Discover(pb.DiscoverRequest(id="late-1"))).agents, "not served before it is in etcd"
    private_etcd.start()
    await eventually(lambda: "late-1" in server.catalog.snapshot.by_id, timeout=30)
    assert not server.leases.pending
    answer = await stub.Register(pb.Agent(id="late-2", name="chat-agent", address="127.0.0.1", port=9002))
    assert not answer.pending


async def test_health_serving_once_synced_and_reflection(private_etcd: EtcdProcess, make_server,
                                                         channel_to) -> None:
    private_etcd.stop()
    server = await make_server(endpoint=private_etcd.endpoint)
    channel = channel_to(server)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "sidecar.v1.Discovery"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    private_etcd.start()

    async def serving() -> bool:
        answer = await health.Check(health_pb2.HealthCheckRequest(service="sidecar.v1.Discovery"))
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    await eventually(serving, timeout=30, what="health SERVING")

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflect.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    answer = await asyncio.wait_for(call.read(), _WAIT)
    names = {s.name for s in answer.list_services_response.service}
    assert {"sidecar.v1.Discovery", "grpc.health.v1.Health"} <= names
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="sidecar.v1.Discovery"))
    answer = await asyncio.wait_for(call.read(), _WAIT)
    assert answer.file_descriptor_response.file_descriptor_proto
    await call.done_writing()


async def test_stop_ends_watch_streams_and_reports_not_serving(etcd: EtcdProcess, prefix: str) -> None:
    server = Server(sidecar_settings(etcd.endpoint, prefix))
    await server.start()
    try:
        await synced(server)
        async with grpc.aio.insecure_channel(target(server)) as channel:
            stream = Stream(pb_grpc.DiscoveryStub(channel), pb.WatchRequest())
            await stream.expect(pb.WatchEvent.SNAPSHOT, server.catalog.snapshot.revision)
            health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            first = await asyncio.wait_for(health.read(), _WAIT)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.ensure_future(server.stop())
            last = await asyncio.wait_for(health.read(), _WAIT)
            assert last.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # The stream ends with OK (closed by the server), not cancelled at the end of the stop grace.
            assert await asyncio.wait_for(stream.call.read(), _WAIT) is grpc.aio.EOF
            assert await stream.call.code() == grpc.StatusCode.OK
            await stopping
    finally:
        if server.grpc._server is not None:
            await server.stop()


async def test_a_taken_port_fails_the_start(make_server) -> None:
    first = await make_server()
    with pytest.raises(OSError, match="gRPC API: cannot listen on"):
        await make_server(grpc={"listen": target(first)})


async def test_watch_and_sse_send_the_same_events(make_server, etcd: EtcdProcess, prefix: str, channel_to) -> None:
    server = await make_server()
    await synced(server)
    key = f"{prefix}/services/chat-agent/chat-1"
    names = {pb.WatchEvent.SNAPSHOT: "snapshot", pb.WatchEvent.UPSERT: "upsert", pb.WatchEvent.DELETE: "delete"}
    grpc_stream = Stream(pb_grpc.DiscoveryStub(channel_to(server)), pb.WatchRequest(capability="chat"))
    admin_host, admin_port = server.admin.address
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://{admin_host}:{admin_port}/v1/watch?capability=chat") as sse:

        async def sse_event() -> tuple[str, int, list[str]]:
            kind = data = ""
            while True:
                line = (await asyncio.wait_for(sse.content.readline(), _WAIT)).decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif line == "" and kind:
                    body = json.loads(data)
                    if kind == "snapshot":
                        ids = [a["id"] for a in body["agents"]]
                    else:
                        ids = [body["agent"]["id"] if kind == "upsert" else body["id"]]
                    return kind, body["revision"], ids

        async def grpc_event() -> tuple[str, int, list[str]]:
            event = await grpc_stream.next()
            return names[event.type], event.revision, [a.id for a in event.agents]

        assert await sse_event() == await grpc_event()
        for change in (lambda: put(etcd, key, agent("chat-1")), lambda: put(etcd, key, agent("chat-1", version="2")),
                       lambda: delete(etcd, key)):
            revision = change()
            sent = await sse_event()
            assert sent == await grpc_event() and sent[1] == revision


async def test_discover_returns_cards_as_get_cards(make_server, etcd: EtcdProcess, prefix: str, channel_to) -> None:
    server = await make_server()
    card = {"name": "Planner", "url": "http://127.0.0.1:9/", "protocolVersion": "0.3.0",
            "skills": [{"id": "plan", "name": "Plan", "description": "d", "tags": []}]}
    put(etcd, f"{prefix}/services/other/plan-1", agent("plan-1", "other", capabilities=["plan"], tags=[]))
    put(etcd, f"{prefix}/services/other/plan-2", agent("plan-2", "other", capabilities=["plan"], tags=[]))
    last = put(etcd, f"{prefix}/cards/other/plan-1", card)
    await eventually(lambda: server.cards.revision >= last and server.catalog.snapshot.revision >= last - 1)
    stub = pb_grpc.DiscoveryStub(channel_to(server))
    answer = await stub.Discover(pb.DiscoverRequest(capability="plan", include_cards=True))
    assert [a.id for a in answer.agents] == ["plan-1", "plan-2"]
    assert [(c.agent_id, c.name, json.loads(c.card_json)) for c in answer.cards] == [("plan-1", "other", card)]
    assert answer.cards[0].revision == last
    assert not (await stub.Discover(pb.DiscoverRequest(capability="plan"))).cards, "cards only when asked"
    async with aiohttp.ClientSession() as http:
        async with http.get("http://{}:{}/v1/cards?capability=plan".format(*server.admin.address)) as response:
            rest = (await response.json())["cards"]
    assert [(c["id"], c["card"]) for c in rest] == [(c.agent_id, json.loads(c.card_json)) for c in answer.cards]
