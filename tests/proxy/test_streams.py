"""Streams through the proxy: their own idle timeout, and a client that leaves ends the upstream stream at once."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from ..waiting import eventually

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]


class SseAgent:
    """An agent whose /events sends ``count`` events ``gap`` seconds apart, then stays open and silent."""

    def __init__(self, gap: float, count: int) -> None:
        self.gap, self.count = gap, count
        self.disconnected = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

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

    async def start(self) -> SseAgent:
        app = web.Application()
        app.router.add_get("/events", self.events)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


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
