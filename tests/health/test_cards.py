"""Cards in the registry: stored on the agent's lease, watched by every sidecar, refreshed by ETag, size-limited."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from sidecar.model import HEALTHY

from ..etcd_process import EtcdProcess
from ..waiting import eventually
from .conftest import HttpAgent
from .test_a2a import FAST, V1, _agent

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]
CARD_PATH = "/.well-known/agent-card.json"


async def cards(server: Any, query: str = "") -> list[dict[str, Any]]:
    url = "http://{}:{}/v1/cards{}".format(*server.admin.address, query)
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        return (await response.json())["cards"]


async def test_the_card_is_stored_on_the_agents_lease_and_every_sidecar_holds_it(
        make_server: Callable[..., Any], http_agent: HttpAgent, etcd: EtcdProcess, prefix: str) -> None:
    http_agent.cards[CARD_PATH] = V1
    local = await make_server(agent=_agent(http_agent.port, name="trip"), health_check=FAST,
                              a2a={"card_refresh": 1})
    observer = await make_server()
    await eventually(lambda: observer.cards.of("trip", "card-1") is not None, 15, "the card in another sidecar")
    # The card and the agent's record (its capabilities from the card's skills) come by two watches.
    await eventually(lambda: [a.id for a in observer.catalog.snapshot.select(capability="plan-trip")] == ["card-1"],
                     15, "the agent with the card's capabilities in another sidecar")
    listed = await cards(observer, "?capability=plan_trip")
    assert [(c["id"], c["health"], c["card"]["name"]) for c in listed] == [("card-1", HEALTHY, "Travel Planner")]
    assert listed[0]["key"] == f"{prefix}/cards/trip/card-1"
    assert [c["id"] for c in await cards(observer, "?skill=BOOK-HOTEL")] == ["card-1"]
    assert await cards(observer, "?skill=nothing") == [] and await cards(observer, "?capability=other") == []
    assert [c["id"] for c in await cards(observer, "?tag=Multi Step")] == ["card-1"]
    stored_lease = json.loads(etcd.ctl("get", f"{prefix}/cards/trip/card-1", "-w", "json"))["kvs"][0]["lease"]
    agent_lease = json.loads(etcd.ctl("get", f"{prefix}/services/trip/card-1", "-w", "json"))["kvs"][0]["lease"]
    assert stored_lease == agent_lease, "the card lives and dies with the agent"

    # The card changes: the next conditional GET sees it; skills become capabilities at once.
    changed = copy.deepcopy(V1)
    changed["skills"].append({"id": "rent-car", "name": "Cars", "description": "d", "tags": ["cars"]})
    await eventually(lambda: any(status == 304 for _, _, status in http_agent.card_requests), 15,
                     "a conditional GET answered 304 (unchanged)")
    http_agent.cards[CARD_PATH] = changed
    await eventually(lambda: (c := observer.cards.of("trip", "card-1")) is not None and "rent-car" in c.card.skills,
                     15, "the changed card")
    await eventually(lambda: observer.catalog.snapshot.by_capability.get("rent-car"), 15, "the new capability")

    await local.stop()
    await eventually(lambda: observer.cards.of("trip", "card-1") is None, 15, "the card gone with the lease")


async def test_a_card_over_the_limit_is_refused_and_the_agent_stays(
        make_server: Callable[..., Any], http_agent: HttpAgent) -> None:
    big = copy.deepcopy(V1)
    big["description"] = "x" * 5000
    http_agent.cards[CARD_PATH] = big
    local = await make_server(agent=_agent(http_agent.port, name="huge"), health_check=FAST,
                              a2a={"max_card_bytes": 4096})
    observer = await make_server()
    await eventually(lambda: observer.catalog.snapshot.select(agent_id="card-1"), 15, "the agent registered")
    assert observer.cards.of("huge", "card-1") is None and await cards(observer) == []
    assert "larger than 4096 bytes" in local.readiness()["local_agent"]["error"]
    text = local.metrics.exposition().decode()
    assert 'sidecar_health_card_errors_total{reason="too_large"} 1.0' in text


async def test_a_card_written_by_someone_else_that_does_not_parse_is_skipped(
        make_server: Callable[..., Any], etcd: EtcdProcess, prefix: str) -> None:
    observer = await make_server()
    etcd.ctl("put", f"{prefix}/cards/x/x-1", "{not json")
    etcd.ctl("put", f"{prefix}/cards/y/y-1", json.dumps(V1))
    await eventually(lambda: observer.cards.of("y", "y-1") is not None, 15, "the good card")
    assert observer.cards.of("x", "x-1") is None
    assert 'sidecar_health_card_errors_total{reason="invalid"} 1.0' in observer.metrics.exposition().decode()
