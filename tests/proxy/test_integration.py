"""The proxy of a whole sidecar on a real etcd: agents registered in etcd, real backends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from sidecar.model import Agent
from sidecar.server import Server

from ..waiting import eventually
from .test_relay import Backend

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]


@pytest_asyncio.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    started = [Backend(f"agent-{i}") for i in range(2)]
    for backend in started:
        await backend.start()
    yield started
    for backend in started:
        backend.release.set()
        await backend.stop()


async def put(server: Server, *agents: Agent) -> None:
    for agent in agents:
        await server.etcd.put(agent.key(server.settings.etcd.prefix), agent.to_bytes())


async def test_proxy_follows_etcd(make_server: Callable[..., Any], backends: list[Backend]) -> None:
    server: Server = await make_server(load_balancer={"algorithm": "round_robin"}, sticky={"enabled": False})
    first, second = (b.agent() for b in backends)
    await put(server, first, second)
    await eventually(lambda: len(server.catalog.snapshot.agents) == 2, what="agents to sync")
    assert server.proxy.address is not None
    url = f"http://127.0.0.1:{server.proxy.address[1]}"
    async with aiohttp.ClientSession() as session:

        async def agents_seen(times: int = 4, **kw: Any) -> set[str]:
            seen = set()
            for _ in range(times):
                async with session.get(url + "/", headers={"Host": "chat.agents.local"}, **kw) as response:
                    assert response.status == 200
                    seen.add(response.headers["x-sidecar-agent"])
            return seen

        assert await agents_seen() == {"agent-0", "agent-1"}
        # Absolute-form, as a client with HTTP_PROXY set sends it.
        async with session.get("http://agent-1.id.agents.local/x", proxy=url) as response:
            assert response.headers["x-sidecar-agent"] == "agent-1"
        # Health written to etcd steers traffic.
        await put(server, second.with_status("unhealthy"))
        await eventually(lambda: not server.catalog.snapshot.select(agent_id="agent-1")[0].healthy,
                         what="health to sync")
        assert await agents_seen() == {"agent-0"}
        # Deleting the last healthy agent leaves no_healthy_agent; deleting all, unknown_target.
        await server.etcd.delete(first.key(server.settings.etcd.prefix))
        await eventually(lambda: len(server.catalog.snapshot.agents) == 1, what="delete to sync")
        async with session.get(url + "/", headers={"Host": "chat.agents.local"}) as response:
            assert (response.status, response.headers["x-sidecar-error"]) == (503, "no_healthy_agent")
        await server.etcd.delete(second.key(server.settings.etcd.prefix))
        await eventually(lambda: not server.catalog.snapshot.agents, what="delete to sync")
        async with session.get(url + "/", headers={"Host": "chat.agents.local"}) as response:
            assert (response.status, response.headers["x-sidecar-error"]) == (404, "unknown_target")


async def test_non_a2a_posts_are_relayed_byte_for_byte_and_balanced(make_server: Callable[..., Any],
                                                                    backends: list[Backend]) -> None:
    """JSON bodies the A2A reader leaves alone (over a2a.max_body, chunked) or reads and finds no call in."""
    server: Server = await make_server(load_balancer={"algorithm": "round_robin"}, sticky={"enabled": False},
                                       a2a={"max_body": 1024})
    await put(server, *(b.agent() for b in backends))
    await eventually(lambda: len(server.catalog.snapshot.agents) == 2, what="agents to sync")
    assert server.proxy.address is not None
    url = f"http://127.0.0.1:{server.proxy.address[1]}/rpc"
    # Looks like a JSON-RPC call naming a task, but larger than a2a.max_body: streamed untouched, not routed.
    large = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tasks/get",
                        "params": {"id": "t-1", "pad": "x" * 3000}}).encode()
    plain = b'{ "not" : "json-rpc",\n  "n": [1, 2.50, "\\u00e9"] }'  # read before choosing; no call in it

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(large), 700):
            yield large[i:i + 700]

    cases: list[tuple[str, Callable[[], Any], bytes, str]] = [
        ("over a2a.max_body", lambda: large, large, str(len(large))),
        ("chunked", chunks, large, ""),
        ("not JSON-RPC", lambda: plain, plain, str(len(plain))),
    ]
    async with aiohttp.ClientSession() as session:
        for what, data, body, length in cases:
            for backend in backends:
                backend.seen.clear()
            answered = []
            for _ in range(4):
                async with session.post(url, data=data(), headers={"Host": "chat.agents.local",
                                                                   "Content-Type": "application/json"}) as response:
                    assert response.status == 200, what
                    answered.append(response.headers["x-sidecar-agent"])
                    assert (await response.json())["len"] == len(body), what
            assert sorted(answered) == ["agent-0", "agent-0", "agent-1", "agent-1"], what  # round_robin as ever
            for backend in backends:
                assert [seen["body"] for seen in backend.seen] == [body, body], what
                for seen in backend.seen:
                    headers = {name.lower(): value for name, value in seen["headers"]}
                    assert headers[b"content-type"] == b"application/json", what
                    if length:
                        assert headers[b"content-length"] == length.encode(), what
                    else:
                        assert headers[b"transfer-encoding"] == b"chunked" and b"content-length" not in headers, what
    assert server.metrics.proxy.a2a["hit"] == server.metrics.proxy.a2a["miss"] == 0
