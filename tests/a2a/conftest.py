"""Replicas of the SDK demo agent (sidecar/demo_a2a.py) on loopback ports, served on the test's loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio

from sidecar.demo_a2a import DemoA2AAgent
from sidecar.dev import register_a2a_demo
from sidecar.server import Server

from ..waiting import eventually

REPLICAS = ("research-1", "research-2", "research-3")


async def start_replicas(ids: tuple[str, ...], **options: object) -> list[DemoA2AAgent]:
    """Start one demo agent per id (capability ``research``); the caller stops them."""
    started: list[DemoA2AAgent] = []
    try:
        for replica in ids:
            agent = DemoA2AAgent(replica, **options)  # type: ignore[arg-type]
            await agent.start()
            started.append(agent)
    except BaseException:
        await stop_replicas(started)
        raise
    return started


async def stop_replicas(agents: list[DemoA2AAgent]) -> None:
    """Stop them all at once (each takes a uvicorn shutdown tick)."""
    await asyncio.gather(*(agent.stop() for agent in agents))


@pytest_asyncio.fixture
async def a2a_replicas() -> AsyncIterator[list[DemoA2AAgent]]:
    """Three replicas of one A2A agent (ids research-1..3); each has its own in-memory tasks.

    ``agent.port``, ``agent.url``, ``agent.replica`` and ``agent.card_bytes`` (the
    served card, to store in the registry) are what a test needs from each.
    """
    agents = await start_replicas(REPLICAS, chunk_delay=0.05)
    yield agents
    await stop_replicas(agents)


@pytest_asyncio.fixture
async def a2a_agent() -> AsyncIterator[DemoA2AAgent]:
    """One replica (research-1), for tests that talk to the SDK server directly."""
    (agent,) = await start_replicas(REPLICAS[:1], chunk_delay=0.05)
    yield agent
    await agent.stop()



@pytest_asyncio.fixture
async def registered_replicas(make_server: Callable[..., Any],
                              a2a_replicas: list[DemoA2AAgent]) -> tuple[Server, list[DemoA2AAgent]]:
    """A sidecar (real etcd) whose snapshot and card index hold the three replicas, as ``sidecar dev`` does it.

    Each replica is registered with its card's fields (name ``research-agent``,
    capability ``research``) and its card stored on its lease.
    """
    server = await make_server()
    for agent in a2a_replicas:
        await register_a2a_demo(server.leases, agent)
    await eventually(lambda: all(server.cards.of(a.name, a.replica) is not None and a.replica in
                                 server.catalog.snapshot.by_id for a in a2a_replicas),
                     what="the replicas and their cards in the snapshot")
    return server, a2a_replicas
