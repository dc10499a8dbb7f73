"""The relay end to end: real sockets, real aiohttp backends, a catalog filled by hand."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import socket
import typing
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import Metric

from sidecar.catalog import Catalog, Reset
from sidecar.config import Settings, build, merge
from sidecar.metrics import Metrics, ProxyMetrics
from sidecar.model import Agent
from sidecar.proxy.server import ProxyServer

from .conftest import Clock, agent

pytestmark = pytest.mark.asyncio(loop_scope="function")
WAIT = 20.0  # only bounds a hang; nothing here depends on it being short


class Backend:
    """One aiohttp agent whose behaviour tests steer."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.status = 200
        self.retry_after = ""
        self.hits = 0
        self.gate = asyncio.Event()
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.seen: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/ws", self.ws)
        app.router.add_get("/sse", self.sse)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/hang", self.hang)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def echo(self, request: web.Request) -> web.Response:
        self.hits += 1
        body = await request.read()
        self.seen.append({"method": request.method, "headers": list(request.raw_headers), "body": body})
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        return web.json_response({"agent": self.agent_id, "path": request.path_qs, "len": len(body)},
                                 status=self.status, headers=headers)

    async def upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"sha256": digest.hexdigest(), "size": size})

    async def sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await self.gate.wait()  # the test releases this only after "one" reached it through the proxy
        await response.write(b"data: two\n\n")
        await response.write_eof()
        return response

    async def hang(self, request: web.Request) -> web.Response:
        self.entered.set()
        await self.release.wait()
        return web.Response(text="released")

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)
        async for message in socket_:
            await socket_.send_str("echo:" + message.data)
        return socket_

    def agent(self, **kw: Any) -> Agent:
        return agent(self.agent_id, self.port, **kw)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def free_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Harness:
    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends
        self.catalog = Catalog()
        self.clock = Clock()
        self.proxy: ProxyServer | None = None
        self.session: aiohttp.ClientSession | None = None

    def register(self, *agents: Agent) -> None:
        self.catalog.apply([Reset(self.catalog.snapshot.revision + 1,
                                  {f"/services/{a.name}/{a.id}": a for a in agents})])

    async def start(self, **sections: Any) -> ProxyServer:
        base = {"proxy": {"listen": "127.0.0.1:0"}, "sticky": {"enabled": False}}
        settings = build(Settings, merge(base, sections))
        if self.proxy is not None:
            await self.proxy.stop()
        self.proxy = ProxyServer(settings, self.catalog, Metrics().proxy, clock=self.clock)
        await self.proxy.start()
        return self.proxy

    @property
    def url(self) -> str:
        assert self.proxy is not None and self.proxy.address is not None
        return f"http://127.0.0.1:{self.proxy.address[1]}"

    async def get(self, host: str, path: str = "/", method: str = "GET", **kw: Any) -> tuple[int, Any, Any]:
        assert self.session is not None
        headers = {"Host": host, **kw.pop("headers", {})}
        async with self.session.request(method, self.url + path, headers=headers, **kw) as response:
            body = await response.read()
            try:
                data = json.loads(body)
            except ValueError:
                data = body
            return response.status, response.headers, data

    async def raw(self, data: bytes) -> bytes:
        assert self.proxy is not None and self.proxy.address is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.address[1])
        writer.write(data)
        try:
            return await asyncio.wait_for(reader.read(65536), WAIT)
        finally:
            writer.close()


@pytest_asyncio.fixture
async def harness() -> AsyncIterator[Harness]:
    backends = [Backend(f"agent-{i}") for i in range(3)]
    for backend in backends:
        await backend.start()
    h = Harness(backends)
    h.register(*(b.agent() for b in backends))
    h.session = aiohttp.ClientSession(auto_decompress=False)
    yield h
    await h.session.close()
    if h.proxy is not None:
        await h.proxy.stop()
    for backend in backends:
        backend.gate.set()
        backend.release.set()
        await backend.stop()


async def test_routing_forms_and_agent_header(harness: Harness) -> None:
    b0, b1, _ = harness.backends
    harness.register(b0.agent(tags=("gpu",)), b1.agent(name="planner", capabilities=("plan",)))
    await harness.start()
    status, headers, body = await harness.get("chat.agents.local", "/a?q=1")
    assert status == 200 and body == {"agent": "agent-0", "path": "/a?q=1", "len": 0}
    assert headers["x-sidecar-agent"] == "agent-0"
    assert (await harness.get("gpu.chat.agents.local"))[2]["agent"] == "agent-0"
    assert (await harness.get("planner.service.agents.local"))[2]["agent"] == "agent-1"
    assert (await harness.get("agent-1.id.agents.local:80"))[2]["agent"] == "agent-1"
    assert (await harness.get("plan.agents.local"))[1]["x-sidecar-agent"] == "agent-1"


async def test_absolute_form_as_sent_with_http_proxy(harness: Harness) -> None:
    await harness.start()
    assert harness.session is not None
    async with harness.session.get("http://chat.agents.local/x", proxy=harness.url) as response:
        assert response.status == 200 and response.headers["x-sidecar-agent"].startswith("agent-")
        assert (await response.json())["path"] == "/x"


async def test_forwarded_headers_hop_by_hop_and_trace(harness: Harness) -> None:
    harness.register(harness.backends[0].agent())
    await harness.start()
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request = (b"GET /h HTTP/1.1\r\nHost: chat.agents.local\r\nConnection: keep-alive, X-Secret\r\n"
               b"X-Secret: drop-me\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic x\r\nTE: trailers\r\n"
               b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\ntraceparent: " + trace.encode() +
               b"\r\nX-Kept: yes\r\n\r\n")
    response = await harness.raw(request)
    assert b"x-sidecar-agent: agent-" in response
    seen = {k.decode().lower(): v.decode() for k, v in harness.backends[0].seen[-1]["headers"]}
    assert not {"x-secret", "keep-alive", "proxy-authorization", "te"} & set(seen)
    assert seen["x-forwarded-for"] == "10.0.0.1, 10.0.0.2, 127.0.0.1"
    assert [k for k, _ in harness.backends[0].seen[-1]["headers"]].count(b"x-forwarded-for") == 1
    assert seen["x-forwarded-proto"] == "http" and seen["x-forwarded-host"] == "chat.agents.local"
    assert seen["traceparent"] == trace and seen["x-kept"] == "yes"
    await harness.raw(b"GET / HTTP/1.1\r\nHost: chat.agents.local\r\ntraceparent: junk\r\n\r\n")
    created = {k.decode().lower(): v.decode() for k, v in harness.backends[0].seen[-1]["headers"]}["traceparent"]
    assert created.startswith("00-") and len(created) == 55 and created != "junk"


async def test_error_codes(harness: Harness) -> None:
    b0, b1, b2 = harness.backends
    harness.register(b0.agent(status="unhealthy"), agent("dead", free_port(), capabilities=("dead",)))
    await harness.start(load_balancer={"circuit_breaker": {"failure_threshold": 1}, "retries": {"attempts": 0}})
    cases = [
        ("nothing.agents.local", 404, "unknown_target"),
        ("a.b.c.agents.local", 404, "unknown_target"),
        ("chat.agents.local", 503, "no_healthy_agent"),
        ("dead.agents.local", 502, "upstream_error"),
        ("dead.agents.local", 503, "circuit_open"),
    ]
    for host, status, code in cases:
        got, headers, body = await harness.get(host)
        assert (got, headers["x-sidecar-error"], body["code"], body["target"]) == (status, code, code, host), host
        assert body["error"]
    harness.register(b1.agent(capabilities=("slow",)))
    await harness.start(proxy={"listen": "127.0.0.1:0", "read_timeout": 0.2})
    status, headers, body = await harness.get("slow.agents.local", "/hang")
    assert (status, body["code"], headers["x-sidecar-agent"]) == (504, "upstream_timeout", "agent-1")
    await harness.start(proxy={"listen": "127.0.0.1:0", "passthrough": False})
    status, headers, body = await harness.get(f"127.0.0.1:{b2.port}")
    assert (status, body["code"]) == (403, "passthrough_disabled")
    await harness.start(proxy={"listen": "127.0.0.1:0", "rate_limit": 1, "rate_burst": 1})
    assert (await harness.get("slow.agents.local"))[0] == 200
    status, headers, body = await harness.get("slow.agents.local")
    assert (status, body["code"], headers["retry-after"]) == (429, "overloaded", "1")


async def test_concurrency_limit_answers_overloaded(harness: Harness) -> None:
    harness.register(harness.backends[0].agent())
    await harness.start(proxy={"listen": "127.0.0.1:0", "max_concurrency": 1})
    hanging = asyncio.create_task(harness.get("chat.agents.local", "/hang"))
    await asyncio.wait_for(harness.backends[0].entered.wait(), WAIT)
    status, _, body = await harness.get("chat.agents.local")
    assert (status, body["code"]) == (503, "overloaded")
    hanging.cancel()


async def test_passthrough_plain_and_connect(harness: Harness) -> None:
    b2 = harness.backends[2]
    await harness.start()
    status, headers, body = await harness.get(f"127.0.0.1:{b2.port}", "/out")
    assert status == 200 and body["path"] == "/out" and "x-sidecar-agent" not in headers
    # CONNECT to an in-zone name tunnels to a picked agent; to an outside host, to that host.
    for authority, expect in ((b"chat.agents.local:443", b"x-sidecar-agent: agent-"), (b"127.0.0.1:%d" % b2.port, b"")):
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.proxy.address[1])  # type: ignore[union-attr]
        writer.write(b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 200") and expect in head
        writer.write(b"GET /tunnelled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        inner = await asyncio.wait_for(reader.read(), WAIT)
        assert b'"path": "/tunnelled"' in inner
        writer.close()


async def test_request_metrics_carry_the_capability_routed_to(harness: Harness) -> None:
    """capability: the in-zone capability (also for a tagged name and for errors); "-" for a name, an id,
    passthrough; a capability nobody registered is counted under "_other" and gets no value of its own."""
    b0, b1, b2 = harness.backends
    harness.register(b0.agent(), b1.agent(capabilities=("sick",), status="unhealthy"))
    proxy = await harness.start()
    for host in ("chat.agents.local", "chat.agents.local", "gpu.chat.agents.local", "nothing.agents.local",
                 "sick.agents.local", "chatbot.service.agents.local", f"127.0.0.1:{b2.port}"):
        await harness.get(host)
    metrics = proxy.metrics
    assert dict(metrics.requests) == {
        ("capability", "chat", "ok"): 2,
        ("capability", "chat", "unknown_target"): 1,  # no agent has the tag: the capability is known
        ("capability", "_other", "unknown_target"): 1,
        ("capability", "sick", "no_healthy_agent"): 1,
        ("name", "-", "ok"): 1,
        ("external", "-", "ok"): 1,
    }
    assert "nothing" not in metrics.capabilities
    assert {c: sum(s.durations.counts) for c, s in metrics.capabilities.items()} == {"": 2, "chat": 2, "sick": 0}


async def test_smuggling_bad_request_line_and_oversized_headers(harness: Harness) -> None:
    await harness.start(proxy={"listen": "127.0.0.1:0", "max_header_bytes": 2048})
    smuggle = (b"POST / HTTP/1.1\r\nHost: chat.agents.local\r\nContent-Length: 4\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n")
    response = await harness.raw(smuggle)
    assert response.startswith(b"HTTP/1.1 400") and b"x-sidecar-error: bad_request" in response
    assert all(b.hits == 0 for b in harness.backends)
    assert (await harness.raw(b"NOT A REQUEST\r\n\r\n")).startswith(b"HTTP/1.1 400")
    big = b"GET / HTTP/1.1\r\nHost: chat.agents.local\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n"
    response = await harness.raw(big)
    assert response.startswith(b"HTTP/1.1 431") and b"headers_too_large" in response


async def test_sse_arrives_event_by_event(harness: Harness) -> None:
    harness.register(harness.backends[0].agent())
    await harness.start()
    assert harness.session is not None
    async with harness.session.get(harness.url + "/sse", headers={"Host": "chat.agents.local"}) as response:
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), WAIT)
        assert first == b"data: one\n\n"
        harness.backends[0].gate.set()
        assert await asyncio.wait_for(response.content.read(), WAIT) == b"data: two\n\n"


async def test_large_upload_checksum_fixed_and_chunked(harness: Harness) -> None:
    await harness.start()
    payload = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    expected = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    assert (await harness.get("chat.agents.local", "/upload", "POST", data=io.BytesIO(payload)))[2] == expected

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i:i + 100_000]

    assert (await harness.get("chat.agents.local", "/upload", "POST", data=chunks()))[2] == expected


async def test_websocket_echo(harness: Harness) -> None:
    await harness.start()
    assert harness.session is not None
    async with harness.session.ws_connect(harness.url + "/ws", headers={"Host": "chat.agents.local"}) as ws:
        for text in ("hello", "again"):
            await ws.send_str(text)
            assert (await asyncio.wait_for(ws.receive(), WAIT)).data == "echo:" + text


async def test_keep_alive_reuses_upstream_connections(harness: Harness) -> None:
    harness.register(harness.backends[0].agent())
    await harness.start()
    for _ in range(20):
        assert (await harness.get("chat.agents.local"))[0] == 200
    assert harness.proxy is not None
    metrics = harness.proxy.metrics
    assert metrics.upstream_connections == 1
    assert metrics.pool_reuses == 19


async def test_breaker_trip_half_open_and_recovery(harness: Harness) -> None:
    flaky = harness.backends[0]
    harness.register(flaky.agent())
    await harness.start(load_balancer={"circuit_breaker": {"failure_threshold": 2, "timeout": 30},
                                       "retries": {"attempts": 0}})
    flaky.status = 503
    assert [(await harness.get("chat.agents.local"))[0] for _ in range(2)] == [503, 503]
    proxy = harness.proxy
    assert proxy is not None and proxy.breaker_state("agent-0") == "open"
    assert breaker_samples(proxy.metrics) == {("sidecar_proxy_breakers", "closed"): 0,
                                              ("sidecar_proxy_breakers", "open"): 1,
                                              ("sidecar_proxy_breakers", "half_open"): 0,
                                              ("sidecar_proxy_breaker_state", "agent-0"): 1}
    status, _, body = await harness.get("chat.agents.local")
    assert (status, body["code"], flaky.hits) == (503, "circuit_open", 2)
    flaky.status = 200
    harness.clock.advance(30)
    assert (await harness.get("chat.agents.local"))[0] == 200  # the half-open trial
    assert proxy.breaker_state("agent-0") == "closed" and flaky.hits == 3
    # Closed again: counted among the closed ones, no series of its own.
    assert breaker_samples(proxy.metrics) == {("sidecar_proxy_breakers", "closed"): 1,
                                              ("sidecar_proxy_breakers", "open"): 0,
                                              ("sidecar_proxy_breakers", "half_open"): 0}


def breaker_samples(metrics: ProxyMetrics) -> dict[tuple[str, str], float]:
    """(family, state or agent) -> value of the breaker gauges, as a scrape would read them."""
    return {(sample.name, next(iter(sample.labels.values()))): sample.value
            for family in typing.cast("list[Metric]", metrics.collect())
            if family.name.startswith("sidecar_proxy_breaker") for sample in family.samples}


async def test_retries_only_when_safe(harness: Harness) -> None:
    bad, good, _ = harness.backends
    bad.status = 503
    harness.register(bad.agent(), good.agent())
    await harness.start(load_balancer={"algorithm": "round_robin", "retries": {"attempts": 2}})
    # Idempotent: the 503 from agent-0 is retried on agent-1.
    status, headers, _ = await harness.get("chat.agents.local")
    assert (status, headers["x-sidecar-agent"], bad.hits, good.hits) == (200, "agent-1", 1, 1)
    # POST whose body reached agent-0: never sent again.
    status, headers, _ = await harness.get("chat.agents.local", method="POST", data=b"x")
    statuses = (status, headers["x-sidecar-agent"])
    # round robin: this POST went to agent-0 (answered 503, not retried) or agent-1 (answered 200).
    assert statuses in ((503, "agent-0"), (200, "agent-1"))
    assert bad.hits + good.hits == 3
    # POST to a refused port: nothing was sent, so another agent gets it.
    harness.register(agent("refused", free_port()), good.agent())
    for _ in range(2):
        status, headers, _ = await harness.get("chat.agents.local", method="POST", data=b"x")
        assert (status, headers["x-sidecar-agent"]) == (200, "agent-1")


async def test_sticky_cookie_through_the_relay(harness: Harness) -> None:
    await harness.start(sticky={"enabled": True}, load_balancer={"algorithm": "round_robin"})
    _, headers, body = await harness.get("chat.agents.local")
    cookie = headers["set-cookie"].split(";")[0]
    pinned = body["agent"]
    harness.register(*(b.agent() for b in harness.backends), agent("new", harness.backends[0].port))
    for _ in range(6):
        _, headers, body = await harness.get("chat.agents.local", headers={"Cookie": cookie})
        assert body["agent"] == pinned and "set-cookie" not in headers
    for _ in range(2):
        _, _, body = await harness.get("chat.agents.local", headers={"X-Session-Id": "s-1"})
        session_agent = body["agent"]
    assert {(await harness.get("chat.agents.local", headers={"X-Session-Id": "s-1"}))[2]["agent"]
            for _ in range(5)} == {session_agent}


async def test_settings_swap_live(harness: Harness) -> None:
    proxy = await harness.start(load_balancer={"algorithm": "round_robin"})
    s = proxy.settings
    proxy.update(s.load_balancer, s.sticky, dataclasses.replace(s.proxy, passthrough=False), s.a2a, panic=False)
    assert (await harness.get(f"127.0.0.1:{harness.backends[0].port}"))[0] == 403



# -- the fast path: requests served from the socket callbacks when a pooled connection is at hand


def fast_starts(proxy: ProxyServer) -> int:
    """Requests ``Relay.begin`` started from the client's read callback (each request is offered once)."""
    assert proxy._relay is not None
    return proxy._relay.fast_starts


async def test_fast_path_retries_a_failure_status_elsewhere(harness: Harness) -> None:
    bad, good, _ = harness.backends
    harness.register(bad.agent(), good.agent())
    proxy = await harness.start(load_balancer={"algorithm": "round_robin", "retries": {"attempts": 2}})
    for _ in range(4):  # both agents get a pooled connection
        assert (await harness.get("chat.agents.local"))[0] == 200
    fast = fast_starts(proxy)
    bad.status = 503
    for _ in range(4):
        status, headers, body = await harness.get("chat.agents.local")
        assert (status, headers["x-sidecar-agent"], body["agent"]) == (200, "agent-1", "agent-1")
    assert fast_starts(proxy) - fast == 4
    assert bad.hits == 2 + 2  # round robin sent every other request to agent-0 first
    assert proxy.metrics.retries._value.get() == 2
    attempts = proxy.metrics.attempts
    assert attempts["failure_status"] == 2
    assert attempts["success"] == 4 + 4
    assert proxy.metrics.requests["capability", "chat", "ok"] == 4 + 4
    assert proxy.metrics.capabilities["chat"].durations.sum > 0


async def test_fast_path_follows_a_new_snapshot(harness: Harness) -> None:
    proxy = await harness.start(load_balancer={"algorithm": "round_robin"})
    seen = {(await harness.get("chat.agents.local"))[2]["agent"] for _ in range(6)}
    assert seen == {"agent-0", "agent-1", "agent-2"}
    fast = fast_starts(proxy)
    harness.register(harness.backends[2].agent())  # the route stays cached; its agents come from the snapshot
    assert {(await harness.get("chat.agents.local"))[2]["agent"] for _ in range(4)} == {"agent-2"}
    assert fast_starts(proxy) - fast == 4
    harness.register()
    status, headers, body = await harness.get("chat.agents.local")
    assert (status, body["code"], headers.get("x-sidecar-agent")) == (404, "unknown_target", None)


async def test_a_json_post_that_is_no_call_takes_the_fast_path(harness: Harness) -> None:
    """A2A routing reads a small JSON POST before choosing; one whose body (in the read with its head)
    cannot be a JSON-RPC call is started from the read callback as any request, and relayed as sent."""
    proxy = await harness.start(load_balancer={"algorithm": "round_robin"})
    for _ in range(6):  # every agent gets a pooled connection
        assert (await harness.get("chat.agents.local"))[0] == 200
    fast = fast_starts(proxy)
    body = b'{"query": "weather", "limit": 3}'
    seen = set()
    for _ in range(6):
        status, _, answer = await harness.get("chat.agents.local", "/search", "POST", data=body,
                                              headers={"Content-Type": "application/json"})
        assert (status, answer["len"]) == (200, len(body))
        seen.add(answer["agent"])
    assert fast_starts(proxy) - fast == 6 and seen == {"agent-0", "agent-1", "agent-2"}
    assert all(b.seen[-1]["body"] == body for b in harness.backends)
    # A call (or what may be one) is read in the task, before choosing: not from the read callback.
    fast = fast_starts(proxy)
    for call in (b'{"jsonrpc": "2.0", "id": 1, "method": "tasks/get", "params": {"id": "t-1"}}',
                 b'{"\\u006asonrpc": "2.0", "id": 1, "method": "message/send"}'):
        status, _, answer = await harness.get("chat.agents.local", "/", "POST", data=call,
                                              headers={"Content-Type": "application/json"})
        assert (status, answer["len"]) == (200, len(call))
    assert fast_starts(proxy) == fast
    assert proxy.metrics.a2a["miss"] == 1  # tasks/get named a task nobody has seen


async def test_pipelined_requests_are_answered_in_order(harness: Harness) -> None:
    harness.register(harness.backends[0].agent())
    await harness.start()
    assert (await harness.get("chat.agents.local"))[0] == 200  # pooled connection for the fast path
    assert harness.proxy is not None and harness.proxy.address is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.proxy.address[1])
    writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: chat.agents.local\r\n\r\n" % i for i in range(3)))
    paths = []
    for _ in range(3):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        paths.append(json.loads(await reader.readexactly(length))["path"])
    writer.close()
    assert paths == ["/0", "/1", "/2"]


async def test_client_gone_mid_request_gives_everything_back(harness: Harness) -> None:
    slow = harness.backends[0]
    harness.register(slow.agent())
    proxy = await harness.start(proxy={"max_concurrency": 1})
    assert (await harness.get("chat.agents.local"))[0] == 200
    assert proxy.address is not None
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.address[1])
    writer.write(b"GET /hang HTTP/1.1\r\nHost: chat.agents.local\r\n\r\n")
    await asyncio.wait_for(slow.entered.wait(), WAIT)
    assert proxy.policy.limits.active("chat") == 1
    writer.close()
    for _ in range(200):
        if proxy.policy.limits.active("chat") == 0:
            break
        await asyncio.sleep(0.01)
    assert proxy.policy.limits.active("chat") == 0
    assert proxy.policy.loads.in_flight("agent-0") == 0
    slow.release.set()
    assert (await harness.get("chat.agents.local"))[0] == 200  # the concurrency slot is free again


# -- A2A: a card the registry does not hold is read from the agent, within a2a.max_card_bytes


async def test_a_card_read_from_the_agent_is_held_to_max_card_bytes(harness: Harness) -> None:
    served: dict[str, bytes] = {}

    async def card(request: web.Request) -> web.Response:
        return web.Response(body=served["card"], content_type="application/json")

    app = web.Application()
    app.router.add_get("/.well-known/agent-card.json", card)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        harness.register(agent("carded-1", port))
        proxy = await harness.start(a2a={"max_card_bytes": 4096})  # a2a.max_body stays 1 MiB
        url = "http://10.0.0.1:9000/a2a"
        for size, rewritten in ((100, True), (5000, False), (100, True)):
            served["card"] = json.dumps({"name": "c", "url": url, "description": "x" * size, "skills": [],
                                         "signatures": [{"signature": "s"}]}).encode()
            status, _, body = await harness.get("chat.agents.local", "/.well-known/agent-card.json")
            assert status == 200
            if rewritten:
                assert body["url"] == "http://chat.agents.local/a2a" and "signatures" not in body
            else:  # over the limit: not taken as a card, the agent's answer is relayed as it is
                assert body["url"] == url and "signatures" in body
        assert proxy.metrics.a2a["card_fetched"] == 2
        # The limit is live: raised, the same card is rewritten.
        s = proxy.settings
        proxy.update(s.load_balancer, s.sticky, s.proxy, dataclasses.replace(s.a2a, max_card_bytes=8192), panic=False)
        served["card"] = json.dumps({"name": "c", "url": url, "description": "x" * 5000}).encode()
        assert (await harness.get("chat.agents.local", "/.well-known/agent-card.json"))[2]["url"] != url
    finally:
        await runner.cleanup()
