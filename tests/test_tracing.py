"""Tracing and the access log against a real OTLP/HTTP receiver, decoded with opentelemetry-proto."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from sidecar.catalog import Catalog, Reset
from sidecar.config import Settings, build
from sidecar.metrics import Metrics
from sidecar.model import Agent, Health
from sidecar.proxy.server import ProxyServer
from sidecar.tracing import Tracing

pytestmark = pytest.mark.asyncio(loop_scope="function")
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
PARENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"


class Receiver:
    """An OTLP/HTTP trace endpoint: every exported span, decoded."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def export(self, request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self.export)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/traces"  # type: ignore[union-attr]


class Agents:
    """Two aiohttp agents: ``agent-0`` answers ``status0``, ``agent-1`` 200; both record the traceparent."""

    def __init__(self) -> None:
        self.status0 = 200
        self.traceparents: list[str] = []
        self.runners: list[web.AppRunner] = []
        self.agents: list[Agent] = []

    async def start(self) -> None:
        for index in range(2):
            async def handle(request: web.Request, index: int = index) -> web.Response:
                await request.read()
                self.traceparents.append(request.headers.get("traceparent", ""))
                return web.json_response({"agent": index}, status=self.status0 if index == 0 else 200)

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.agents.append(Agent(id=f"agent-{index}", name="chatbot", address="127.0.0.1", port=port,
                                     capabilities=("chat",), health=Health(status="healthy")))


@pytest_asyncio.fixture
async def world() -> AsyncIterator[tuple[Receiver, Agents]]:
    receiver, agents = Receiver(), Agents()
    await receiver.start()
    await agents.start()
    yield receiver, agents
    for runner in [*agents.runners, receiver.runner]:
        assert runner is not None
        await runner.cleanup()


async def proxied(world: tuple[Receiver, Agents], ratio: float, requests: list[dict[str, Any]],
                  access_log: bool = True) -> list[Any]:
    """Run ``requests`` through a traced proxy; the spans the receiver got."""
    receiver, agents = world
    catalog = Catalog()
    catalog.apply([Reset(1, {f"/services/chatbot/{a.id}": a for a in agents.agents})])
    settings = build(Settings, {
        "proxy": {"listen": "127.0.0.1:0", "access_log": access_log}, "sticky": {"enabled": False},
        "load_balancer": {"algorithm": "round_robin"},
        "tracing": {"otlp_endpoint": receiver.url, "sample_ratio": ratio}})
    tracing = Tracing.build(settings.tracing)
    assert tracing is not None
    proxy = ProxyServer(settings, catalog, Metrics().proxy, tracing=tracing)
    await proxy.start()
    assert proxy.address is not None
    try:
        async with aiohttp.ClientSession() as session:
            for request in requests:
                async with session.request(request.get("method", "GET"), f"http://127.0.0.1:{proxy.address[1]}/",
                                           headers={"Host": request.get("host", "chat.agents.local"),
                                                    **request.get("headers", {})},
                                           data=request.get("data")) as response:
                    await response.read()
    finally:
        await proxy.stop()  # exports what is queued
    return receiver.spans


def attributes(span: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


async def test_a_sampled_parent_gets_a_server_span_and_a_client_span_per_attempt(
        world: tuple[Receiver, Agents], caplog: pytest.LogCaptureFixture) -> None:
    _, agents = world
    agents.status0 = 500  # round robin: the first request tries agent-0 (500), then agent-1
    caplog.set_level(logging.INFO, logger="sidecar.access")
    sampled = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
    spans = await proxied(world, 0.0, [{"headers": {"traceparent": sampled}}])
    (server,) = [s for s in spans if s.kind == SERVER]
    clients = sorted((s for s in spans if s.kind == CLIENT), key=lambda s: s.start_time_unix_nano)
    assert server.trace_id.hex() == PARENT_TRACE and server.parent_span_id.hex() == PARENT_SPAN
    assert attributes(server)["http.response.status_code"] == 200
    assert attributes(server)["sidecar.agent.id"] == "agent-1"
    assert attributes(server)["sidecar.attempts"] == 2
    assert attributes(server)["sidecar.capability"] == "chat"
    assert [attributes(c)["sidecar.agent.id"] for c in clients] == ["agent-0", "agent-1"]
    assert [attributes(c)["http.response.status_code"] for c in clients] == [500, 200]
    assert [attributes(c)["sidecar.retried"] for c in clients] == [True, False]
    assert attributes(clients[0])["sidecar.outcome"] == "failure_status"
    for client in clients:
        assert client.trace_id == server.trace_id and client.parent_span_id == server.span_id
    # Each agent saw the trace, with its own attempt's CLIENT span as the parent.
    assert agents.traceparents == [f"00-{PARENT_TRACE}-{c.span_id.hex()}-01" for c in clients]
    (line,) = [r for r in caplog.records if r.name == "sidecar.access"]
    assert (line.trace_id, line.status, line.agent_id, line.attempts, line.outcome) == (  # type: ignore[attr-defined]
        PARENT_TRACE, 200, "agent-1", 2, "ok")


async def test_an_unsampled_parent_is_passed_on_without_spans(world: tuple[Receiver, Agents]) -> None:
    _, agents = world
    unsampled = f"00-{PARENT_TRACE}-{PARENT_SPAN}-00"
    assert await proxied(world, 1.0, [{"headers": {"traceparent": unsampled}}]) == []
    assert agents.traceparents == [unsampled]


async def test_new_traces_follow_the_sample_ratio(world: tuple[Receiver, Agents]) -> None:
    _, agents = world
    call = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {}})
    spans = await proxied(world, 1.0, [{"method": "POST", "data": call}], access_log=False)
    (server,) = [s for s in spans if s.kind == SERVER]
    (client,) = [s for s in spans if s.kind == CLIENT]
    assert server.parent_span_id == b""  # a root
    assert attributes(server)["a2a.method"] == "message/send"
    assert attributes(server)["rpc.system"] == "jsonrpc"
    assert attributes(server)["gen_ai.operation.name"] == "invoke_agent"
    assert agents.traceparents == [f"00-{server.trace_id.hex()}-{client.span_id.hex()}-01"]
    agents.traceparents.clear()
    world[0].spans.clear()
    assert await proxied(world, 0.0, [{}], access_log=False) == []
    (sent,) = agents.traceparents
    assert sent.endswith("-00")  # not sampled here: the agent is told so


async def test_access_log_tells_errors_too(world: tuple[Receiver, Agents],
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.access")
    await proxied(world, 0.0, [{"host": "nobody.agents.local"}, {"host": "a.b.c.agents.local"}, {}])
    lines = [r for r in caplog.records if r.name == "sidecar.access"]
    got = [(r.host, r.status, r.outcome, r.agent_id, r.attempts) for r in lines]  # type: ignore[attr-defined]
    assert got == [("nobody.agents.local", 404, "unknown_target", "", 0),
                   ("a.b.c.agents.local", 404, "unknown_target", "", 0),  # no target form: refused when routed
                   ("chat.agents.local", 200, "ok", "agent-0", 1)]
    for line in lines:
        assert line.method == "GET" and line.duration_ms >= 0  # type: ignore[attr-defined]
    assert len(lines[0].trace_id) == 32 and lines[1].trace_id == ""  # type: ignore[attr-defined]


async def test_tracing_is_off_without_an_endpoint() -> None:
    assert Tracing.build(build(Settings, {}).tracing) is None
