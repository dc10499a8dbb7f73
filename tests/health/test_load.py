"""Load signals: an agent's reported load (x-agent-load on its health check) published as metadata.load,
and the latency- and connection-aware balancers weighing it."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from sidecar.health.active import Tracker
from sidecar.health.checks import Result
from sidecar.model import parse_agent, parse_load
from sidecar.proxy.balancers import PickContext, make
from sidecar.proxy.load import LoadTable

from ..waiting import eventually
from .conftest import HttpAgent
from .test_lifecycle import agent_section, checking


@pytest.mark.parametrize(("text", "load"), [("0.7", 0.7), ("3/8", 0.375), ("", 0.0), ("2", 1.0), ("-1", 0.0),
                                            ("nan", 0.0), ("1/0", 0.0), ("busy", 0.0), ("0.25 ", 0.25)])
def test_parse_load(text: str, load: float) -> None:
    assert parse_load(text) == load


def test_the_tracker_publishes_load_moves_of_at_least_a_step() -> None:
    tracker = Tracker(failure_threshold=3, success_threshold=2)
    assert tracker.observe(Result(True, load=0.5), 0.0) and tracker.verdict.load == 0.5
    assert not tracker.observe(Result(True, load=0.53), 1.0) and tracker.verdict.load == 0.5, "a small move waits"
    assert tracker.observe(Result(True, load=0.9), 2.0) and tracker.verdict.load == 0.9
    assert tracker.observe(Result(True), 3.0) and tracker.verdict.load is None


def agents(*loads: str):
    return [parse_agent({"id": f"a{i}", "name": "n", "address": "127.0.0.1", "port": 80 + i,
                         "metadata": {"load": load} if load else {}}) for i, load in enumerate(loads)]


@pytest.mark.parametrize("name", ["least_conn", "p2c_ewma"])
def test_a_loaded_agent_gets_less_traffic(name: str) -> None:
    candidates = agents("", "0.9")
    balancer = make(name, "")
    ctx = PickContext(random.Random(3), 1000.0, LoadTable())
    picks = [balancer.pick(candidates, ctx).id for _ in range(400)]
    assert picks.count("a0") > 0.9 * len(picks), (name, picks.count("a1"))
    unloaded = agents("", "")
    even = [balancer.pick(unloaded, ctx).id for _ in range(400)]
    assert even.count("a1") > 100, "without a signal both are picked"


@pytest.mark.etcd
@pytest.mark.asyncio
async def test_the_reported_load_reaches_every_sidecar(make_server: Callable[..., Any], http_agent: HttpAgent) -> None:
    http_agent.load = "0.75"
    await make_server(agent=agent_section(http_agent.port), health_check=checking())
    observer = await make_server()

    def published() -> Any:
        found = observer.catalog.snapshot.select(agent_id="echo-1")
        return found and found[0].metadata.get("load")

    await eventually(lambda: published() == "0.75", 20, "the load in the registry")
    http_agent.load = "2/8"
    await eventually(lambda: published() == "0.25", 20, "the new load")
    assert observer.catalog.snapshot.select(agent_id="echo-1")[0].load == 0.25
