"""The SDK replicas registered as ``sidecar dev`` registers its A2A agent: records from the card, cards on the lease."""

from __future__ import annotations

import httpx
import pytest

from sidecar.demo_a2a import DemoA2AAgent
from sidecar.server import Server

pytestmark = [pytest.mark.a2a, pytest.mark.etcd, pytest.mark.asyncio]


async def test_replicas_and_cards_reach_the_registry(registered_replicas: tuple[Server, list[DemoA2AAgent]]) -> None:
    server, agents = registered_replicas
    assert server.admin.address is not None
    host, port = server.admin.address
    async with httpx.AsyncClient(trust_env=False) as http:
        listed = (await http.get(f"http://{host}:{port}/v1/cards?capability=research")).json()["cards"]
    assert sorted(c["id"] for c in listed) == ["research-1", "research-2", "research-3"]
    urls = {c["id"]: c["card"]["supportedInterfaces"][0]["url"] for c in listed}
    assert urls == {a.replica: a.url + "/" for a in agents}
    (record,) = server.catalog.snapshot.by_id["research-2"]
    assert (record.name, record.capabilities, record.port) == ("research-agent", ("research",), agents[1].port)
    assert record.metadata["a2a.card"] == "1.0"
