"""Shared fixtures: a real etcd (session-wide and private), unique key prefixes, a running sidecar."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import pytest_asyncio

from sidecar.config import Settings, build, merge
from sidecar.server import Server

from .etcd_process import EtcdProcess


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdProcess]:
    """One etcd for the whole run; tests isolate themselves with a unique ``prefix``."""
    member = EtcdProcess()
    member.start()
    yield member
    member.cleanup()


@pytest.fixture
def private_etcd() -> Iterator[EtcdProcess]:
    """An etcd of this test's own, for tests that stop, freeze or compact it."""
    member = EtcdProcess()
    member.start()
    yield member
    member.cleanup()


@pytest.fixture
def prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:10]}"


def sidecar_settings(endpoint: str, prefix: str, **sections: dict[str, object]) -> Settings:
    """Settings for a test sidecar: every listener on a free loopback port, forwarding off."""
    base: dict[str, object] = {
        "etcd": {"endpoints": [endpoint], "prefix": prefix, "request_timeout": 3},
        "admin": {"listen": "127.0.0.1:0"},
        "dns": {"listen": "127.0.0.1:0", "upstreams": ["none"]},
        "proxy": {"listen": "127.0.0.1:0"},
        "grpc": {"listen": "127.0.0.1:0"},
        "loop": "asyncio",
    }
    return build(Settings, merge(base, sections))


@pytest_asyncio.fixture
async def make_server(etcd: EtcdProcess, prefix: str) -> AsyncIterator[Callable[..., object]]:
    """``await make_server(**sections)`` starts a sidecar on the shared etcd; all are stopped after."""
    servers: list[Server] = []

    async def make(endpoint: str | None = None, **sections: dict[str, object]) -> Server:
        server = Server(sidecar_settings(endpoint or etcd.endpoint, prefix, **sections))
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        await server.stop()
