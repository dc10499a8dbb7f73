"""The composition root: components see each other where the contract says they do."""

from __future__ import annotations

from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web

from sidecar.config import Settings, live_keys
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


async def test_every_live_section_reaches_a_component(make_server) -> None:
    """``apply`` hands a changed section to the components that read it: none is left out."""
    server: Server = await make_server()
    taken = set().union(*(sections for sections, _ in server.updates))
    live = {key.split(".", 1)[0] for key in live_keys(Settings)}
    assert live <= taken, f"no component takes {sorted(live - taken)}"
    assert "etcd" not in taken and "grpc" not in taken, "restart-only sections have no update"


async def test_an_a2a_only_change_reaches_the_proxy_cards_and_local_agent(make_server) -> None:
    server: Server = await make_server(agent={"name": "me", "port": 9})
    old = server.settings
    a2a = replace(old.a2a, max_body=4096, max_card_bytes=8192, max_tasks=64, card_refresh=45.0)
    server.apply(old, replace(old, a2a=a2a))
    assert server.proxy.a2a.max_body == 4096 and server.proxy.a2a.owners.max_tasks == 64
    assert server.card_sync.max_card_bytes == 8192
    assert server.local_agent is not None and server.local_agent.a2a == a2a
