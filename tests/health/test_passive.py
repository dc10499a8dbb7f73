"""Passive health and panic through a whole sidecar on a real etcd: the proxy's outcomes eject
a dead agent; with panic on, DNS and the proxy serve unhealthy agents rather than none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from sidecar.model import parse_agent
from sidecar.server import Server

from ..etcd_process import free_port
from ..waiting import eventually
from .conftest import HttpAgent, answers

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]


async def put(server: Server, agent_id: str, port: int, status: str = "healthy") -> None:
    agent = parse_agent({"id": agent_id, "name": "echo", "address": "127.0.0.1", "port": port,
                         "capabilities": ["echo"], "health": {"status": status}})
    await server.etcd.put(agent.key(server.settings.etcd.prefix), agent.to_bytes())


async def get(server: Server, host: str) -> tuple[int, str]:
    assert server.proxy.address is not None
    url = f"http://127.0.0.1:{server.proxy.address[1]}/health"
    async with aiohttp.ClientSession() as session, session.get(url, headers={"Host": host}) as response:
        await response.read()
        agent = response.headers.get("x-sidecar-agent") or response.headers.get("x-sidecar-error")
        return response.status, agent or ""


async def test_panic_serves_unhealthy_agents_rather_than_none(make_server: Callable[..., Any],
                                                              http_agent: HttpAgent) -> None:
    strict = await make_server()
    panicky = await make_server(health_check={"panic": True})
    await put(strict, "sick-1", http_agent.port, "unhealthy")
    for server in (strict, panicky):
        await eventually(lambda s=server: s.catalog.snapshot.select(agent_id="sick-1"), 10, "sync")
    assert await answers(strict, "echo.agents.local") == []
    assert await answers(panicky, "echo.agents.local") == ["127.0.0.1"]
    assert await get(strict, "echo.agents.local") == (503, "no_healthy_agent")
    assert await get(panicky, "echo.agents.local") == (200, "sick-1")
    # One healthy agent is enough: panic then changes nothing.
    await put(strict, "well-1", http_agent.port)
    await eventually(lambda: len(panicky.catalog.snapshot.agents) == 2, 10, "sync")
    assert {(await get(panicky, "echo.agents.local"))[1] for _ in range(6)} == {"well-1"}


async def test_proxy_outcomes_eject_a_dead_agent(make_server: Callable[..., Any], http_agent: HttpAgent) -> None:
    server = await make_server(
        health_check={"outlier_detection": {"consecutive_failures": 2, "base_ejection_time": 60}},
        load_balancer={"algorithm": "round_robin", "circuit_breaker": {"failure_threshold": 100}},
        sticky={"enabled": False})
    await put(server, "live-1", http_agent.port)
    await put(server, "dead-1", free_port())  # nothing listens there: connect errors
    await eventually(lambda: len(server.catalog.snapshot.agents) == 2, 10, "sync")
    for _ in range(8):
        status, _agent = await get(server, "echo.agents.local")
        assert status == 200  # the retry goes to the live agent
        if server.outliers.ejected("dead-1"):
            break
    assert server.outliers.ejected("dead-1")
    assert not server.outliers.ejected("live-1"), "never more than half of a capability's agents"
    assert server.metrics.health.ejections._value.get() == 1
    before = server.metrics.proxy.retries._value.get()
    assert {(await get(server, "echo.agents.local"))[1] for _ in range(6)} == {"live-1"}
    assert server.metrics.proxy.retries._value.get() == before, "an ejected agent got traffic"
    # Its own sidecar publishing a recovery ends the ejection.
    await put(server, "dead-1", 1, "unhealthy")
    await eventually(lambda: server.catalog.snapshot.select(agent_id="dead-1")[0].health.status == "unhealthy", 10,
                   "sync")
    await put(server, "dead-1", 1, "healthy")
    await eventually(lambda: not server.outliers.ejected("dead-1"), 10, "the recovery to end the ejection")
