"""Streams through the proxy: their own idle timeout, and a client that leaves ends the upstream stream at once."""

from __future__ import annotations

import asyncio
import typing

import aiohttp
import pytest
from aiohttp import web

from ..waiting import eventually

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]


class AppAgent:
    """An aiohttp agent on a free loopback port serving what ``routes`` adds."""

    handler_cancellation = False

    def __init__(self) -> None:
        self.port = 0
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> typing.Self:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, handler_cancellation=self.handler_cancellation)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


class SseAgent(AppAgent):
    """An agent whose /events sends ``count`` events ``gap`` seconds apart, then stays open and silent."""

    handler_cancellation = True

    def __init__(self, gap: float, count: int) -> None:
        super().__init__()
        self.gap, self.count = gap, count
        self.disconnected = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/events", self.events)

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(self.count):
                await response.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(self.gap)
            await asyncio.sleep(3600)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response


async def start(make_server, agent: SseAgent, **proxy: object):
    server = await make_server(proxy=proxy)
    async with aiohttp.ClientSession() as http:
        async with http.post("http://{}:{}/v1/agents".format(*server.admin.address), json={
                "id": "sse-1", "name": "sse", "address": "127.0.0.1", "port": agent.port,
                "capabilities": ["sse"], "ttl": "10s"}) as response:
            assert response.status == 201
    await eventually(lambda: "sse-1" in server.catalog.snapshot.by_id)
    return server


async def test_a_stream_has_its_own_idle_timeout(make_server) -> None:
    agent = await SseAgent(gap=0.6, count=4).start()
    try:
        # Gaps longer than read_timeout do not end a stream; silence longer than stream_idle_timeout does.
        server = await start(make_server, agent, read_timeout="0.3s", stream_idle_timeout="1.5s")
        proxy = "http://{}:{}".format(*server.proxy.address)
        got = []
        async with aiohttp.ClientSession() as http:
            async with http.get(proxy + "/events", headers={"Host": "sse.agents.local"}) as response:
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for line in response.content:
                        if line.startswith(b"data:"):
                            got.append(line.strip())
        assert got == [b"data: 0", b"data: 1", b"data: 2", b"data: 3"]
    finally:
        await agent.stop()


async def test_a_client_that_leaves_ends_the_upstream_stream(make_server) -> None:
    agent = await SseAgent(gap=0.05, count=2).start()
    try:
        server = await start(make_server, agent)
        proxy = "http://{}:{}".format(*server.proxy.address)
        async with aiohttp.ClientSession() as http:
            response = await http.get(proxy + "/events", headers={"Host": "sse.agents.local"})
            assert (await response.content.readline()).startswith(b"data: 0")
            response.close()  # the client goes away mid-stream
        await asyncio.wait_for(agent.disconnected.wait(), 10)
    finally:
        await agent.stop()


async def test_a_client_that_leaves_in_the_middle_of_an_a2a_call_leaves_nothing_behind(make_server) -> None:
    """Found by tests/fuzz/fuzz_http.py: the connection's task waited forever for the rest of the body."""
    server = await make_server()
    host, port = server.proxy.address
    _, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST / HTTP/1.1\r\nHost: sse.agents.local\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"jsonrpc\": ")
    await writer.drain()
    await eventually(lambda: len(server.proxy._relay.connections) == 1)  # type: ignore[union-attr]
    (connection,) = server.proxy._relay.connections  # type: ignore[union-attr]
    task = connection.task
    assert task is not None and not task.done()
    writer.close()
    await writer.wait_closed()

    await eventually(lambda: not server.proxy._relay.connections and task.done(),  # type: ignore[union-attr]
                     what="the connection and its task gone")


# -- tunnels (WebSocket Upgrade and CONNECT) end after proxy.stream_idle_timeout without a byte either way

IDLE = "0.5s"


class WsAgent(AppAgent):
    """An aiohttp WebSocket agent that echoes every message; ``ended`` is set when a socket closes."""

    def __init__(self) -> None:
        super().__init__()
        self.ended = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/ws", self.ws)

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)
        try:
            async for message in socket_:
                await socket_.send_str("echo:" + message.data)
        finally:
            self.ended.set()
        return socket_


class EchoAgent:
    """A raw TCP agent that echoes bytes (what a CONNECT tunnel reaches); ``ended`` is set at its EOF."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.ended.set()
            writer.close()

    async def start(self) -> EchoAgent:
        self._server = await asyncio.start_server(self.echo, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def register(server, agent_id: str, capability: str, port: int) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post("http://{}:{}/v1/agents".format(*server.admin.address), json={
                "id": agent_id, "name": capability, "address": "127.0.0.1", "port": port,
                "capabilities": [capability], "ttl": "10s"}) as response:
            assert response.status == 201
    await eventually(lambda: agent_id in server.catalog.snapshot.by_id)


async def test_a_websocket_lives_while_messages_flow_and_ends_when_idle(make_server) -> None:
    agent = await WsAgent().start()
    try:
        server = await make_server(proxy={"stream_idle_timeout": IDLE})
        await register(server, "ws-1", "ws", agent.port)
        proxy = "http://{}:{}".format(*server.proxy.address)
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(proxy + "/ws", headers={"Host": "ws.agents.local"}) as ws:
                # A message every 0.2 s for 1.5 s: three times the idle timeout, and the tunnel stays.
                loop = asyncio.get_running_loop()
                for i in range(8):
                    await asyncio.sleep(0.2 if i else 0)
                    await ws.send_str(f"m{i}")
                    assert (await asyncio.wait_for(ws.receive(), 10)).data == f"echo:m{i}"
                quiet_since = loop.time()
                assert not ws.closed and server.metrics.proxy.tunnels == 1
                message = await asyncio.wait_for(ws.receive(), 10)  # nothing is sent: the proxy ends it
                assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
                assert loop.time() - quiet_since >= 0.4
        await asyncio.wait_for(agent.ended.wait(), 10)  # the agent's side was closed too
        await eventually(lambda: server.metrics.proxy.tunnels == 0, 10, "the tunnel counted out")
    finally:
        await agent.stop()


async def connect_through(server, authority: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*server.proxy.address)
    writer.write(b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    return reader, writer


async def test_a_connect_tunnel_lives_while_bytes_flow_and_ends_when_idle(make_server) -> None:
    agent = await EchoAgent().start()
    try:
        server = await make_server(proxy={"stream_idle_timeout": IDLE})
        await register(server, "echo-1", "echo", agent.port)
        reader, writer = await connect_through(server, b"echo.agents.local:443")
        try:
            loop = asyncio.get_running_loop()
            for i in range(8):  # 0.2 s apart, 1.5 s in all
                await asyncio.sleep(0.2 if i else 0)
                writer.write(b"ping %d\n" % i)
                assert await asyncio.wait_for(reader.readline(), 10) == b"ping %d\n" % i
            quiet_since = loop.time()
            assert await asyncio.wait_for(reader.read(), 10) == b"", "the proxy closes an idle tunnel"
            assert loop.time() - quiet_since >= 0.4
            await asyncio.wait_for(agent.ended.wait(), 10)
        finally:
            writer.close()
    finally:
        await agent.stop()


async def test_the_tunnel_idle_timeout_follows_a_configuration_change(make_server) -> None:
    agent = await EchoAgent().start()
    try:
        server = await make_server()  # 300 s
        await register(server, "echo-1", "echo", agent.port)
        async with aiohttp.ClientSession() as http:
            async with http.put("http://{}:{}/v1/config".format(*server.admin.address),
                                json={"proxy": {"stream_idle_timeout": IDLE}}) as response:
                assert response.status == 200, await response.text()
        await eventually(lambda: server.settings.proxy.stream_idle_timeout == 0.5, 10, "the change applied")
        reader, writer = await connect_through(server, b"echo.agents.local:443")
        try:
            writer.write(b"hello\n")
            assert await asyncio.wait_for(reader.readline(), 10) == b"hello\n"
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()
    finally:
        await agent.stop()
