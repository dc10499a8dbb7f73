"""Each check type against a real server, through one parametrised fixture: healthy, unhealthy, gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sidecar.health.checks import HealthCheck, host_port, make, target

from .conftest import HttpAgent


@dataclass
class Target:
    """A live server of one check type and the switches a test flips."""

    kind: str
    check: HealthCheck
    server: Any
    port: int = 0

    async def set_healthy(self, healthy: bool) -> None:
        if self.kind == "http":
            self.server.status = 200 if healthy else 500
        elif self.kind == "grpc":
            servicer, _ = self.server
            status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
            await servicer.set("", status)
        elif healthy:  # tcp: listen again on the same port
            self.server = await asyncio.start_server(_hang_up, "127.0.0.1", self.port)
        else:
            await self.stop()

    async def stop(self) -> None:
        if self.kind == "http":
            await self.server.stop()
        elif self.kind == "tcp":
            if not self.server.is_serving():
                return
            self.server.close()
            await self.server.wait_closed()
        else:
            await self.server[1].stop(None)


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def start_target(kind: str) -> Target:
    if kind == "http":
        agent = await HttpAgent().start()
        return Target(kind, make(kind, target(kind, "", "127.0.0.1", agent.port), 2.0), agent, agent.port)
    if kind == "tcp":
        server = await asyncio.start_server(_hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        return Target(kind, make(kind, target(kind, "", "127.0.0.1", port), 2.0), server, port)
    servicer = health.aio.HealthServicer()
    grpc_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return Target(kind, make(kind, target(kind, "", "127.0.0.1", port), 2.0), (servicer, grpc_server), port)


@pytest_asyncio.fixture(params=["http", "tcp", "grpc"])
async def live(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    started = await start_target(request.param)
    yield started
    await started.check.close()
    await started.stop()


@pytest.mark.asyncio
async def test_healthy_server_passes(live: Target) -> None:
    result = await live.check.check()
    assert result.healthy, result.detail
    assert not result.loaded


@pytest.mark.asyncio
async def test_unhealthy_then_healthy_again(live: Target) -> None:
    await live.set_healthy(False)
    result = await live.check.check()
    assert not result.healthy
    assert result.detail in ("HTTP 500", "NOT_SERVING") or live.kind == "tcp"
    await live.set_healthy(True)
    assert (await live.check.check()).healthy


@pytest.mark.asyncio
async def test_stopped_server_fails(live: Target) -> None:
    assert (await live.check.check()).healthy
    await live.stop()
    result = await live.check.check()
    assert not result.healthy
    assert result.detail


@pytest.mark.asyncio
async def test_http_429_is_healthy_but_loaded(http_agent: HttpAgent) -> None:
    check = make("http", f"http://127.0.0.1:{http_agent.port}/health", 2.0)
    try:
        http_agent.status = 429
        result = await check.check()
        assert result.healthy and result.loaded
        http_agent.status = 503
        assert not (await check.check()).healthy
    finally:
        await check.close()


@pytest.mark.asyncio
async def test_grpc_asks_about_one_service() -> None:
    live = await start_target("grpc")
    servicer, server = live.server
    port = host_port(live.check.target)[1]  # type: ignore[attr-defined]
    check = make("grpc", f"grpc://127.0.0.1:{port}/agent.v1.Chat", 2.0)
    try:
        unknown = await check.check()
        assert not unknown.healthy and unknown.detail.startswith("NOT_FOUND")
        await servicer.set("agent.v1.Chat", health_pb2.HealthCheckResponse.SERVING)
        assert (await check.check()).healthy
    finally:
        await check.close()
        await live.check.close()
        await server.stop(None)


def test_targets_and_bad_values() -> None:
    assert target("http", "", "10.0.0.1", 8080) == "http://10.0.0.1:8080/health"
    assert target("tcp", "", "::1", 9) == "[::1]:9"
    assert target("grpc", "grpc://h:1/x", "ignored", 2) == "grpc://h:1/x"
    assert host_port("grpc://[::1]:50051/pkg.Svc") == ("::1", 50051, "pkg.Svc")
    with pytest.raises(ValueError, match="unknown health check type"):
        make("icmp", "x:1", 1.0)
    with pytest.raises(ValueError, match="not host:port"):
        make("tcp", "localhost", 1.0)
    with pytest.raises(ValueError, match="http:// or https://"):
        make("http", "localhost:80/health", 1.0)
