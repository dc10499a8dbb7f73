"""The composition root: components see each other where the contract says they do."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from sidecar.server import Server

from .test_admin import base
from .waiting import eventually

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]


async def test_proxy_traffic_shows_in_metrics_and_breaker_state_in_agents(make_server) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        server: Server = await make_server()
        url = base(server)
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/agents", json={
                    "id": "echo-1", "name": "echo", "address": "127.0.0.1", "port": port,
                    "capabilities": ["echo"]}) as response:
                assert response.status == 201
            await eventually(lambda: "echo-1" in server.catalog.snapshot.by_id)
            proxy_host, proxy_port = server.proxy.address
            for _ in range(3):
                async with http.get(f"http://{proxy_host}:{proxy_port}/",
                                    headers={"Host": "echo.agents.local"}) as response:
                    assert response.status == 200 and response.headers["x-sidecar-agent"] == "echo-1"
            # Scraped right away: the proxy's cheap counters are folded in before rendering.
            async with http.get(url + "/metrics") as response:
                text = await response.text()
            assert 'sidecar_proxy_requests_total{capability="echo",kind="capability",outcome="ok"} 3.0' in text
            async with http.get(url + "/v1/agents/echo-1") as response:
                assert (await response.json())["breaker"] == "closed"
    finally:
        await runner.cleanup()
