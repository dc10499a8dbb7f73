"""The local agent end to end on a real etcd: registration after the first pass, failure and
recovery seen in a second sidecar's DNS answers, SIGKILL, SIGTERM, etcd restart, lost lease.

Bounds are correctness bounds with room for a loaded machine, never speed assertions.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.model import HEALTHY, UNHEALTHY
from sidecar.server import Server

from ..etcd_process import EtcdProcess
from ..waiting import eventually
from .conftest import HttpAgent, SidecarProcess, answers
from .test_checks import start_target

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]

INTERVAL = 0.5
THRESHOLD = 3
SLACK = 5.0  # scheduling room on two shared cores; the bounds below are about correctness


def agent_section(port: int, agent_id: str = "echo-1", **extra: Any) -> dict[str, Any]:
    return {"name": "echo", "id": agent_id, "address": "127.0.0.1", "port": port, "capabilities": ["echo"],
            **extra}


def checking(**extra: Any) -> dict[str, Any]:
    return {"interval": INTERVAL, "timeout": 0.5, "failure_threshold": THRESHOLD, "success_threshold": 2,
            "drain_period": 0.2, **extra}


def status_in(server: Server, agent_id: str) -> str | None:
    """The health status a sidecar's snapshot holds for ``agent_id`` (None when it is not registered)."""
    found = server.catalog.snapshot.select(agent_id=agent_id)
    return found[0].health.status if found else None


async def test_registers_after_first_pass_then_follows_failure_and_recovery(
        make_server: Callable[..., Any], http_agent: HttpAgent) -> None:
    http_agent.status = 500
    local = await make_server(agent=agent_section(http_agent.port), health_check=checking())
    observer = await make_server()
    await eventually(lambda: http_agent.checks >= THRESHOLD + 1, 10 + SLACK, "the failing agent to be checked")
    assert status_in(observer, "echo-1") is None, "registered before its first passing check"
    assert local.readiness()["local_agent"] == {"registered": False, "status": UNHEALTHY}

    http_agent.status = 200
    await eventually(lambda: answers(observer, "echo.agents.local"), 2 * INTERVAL + SLACK, "registration")
    assert await answers(observer, "echo.agents.local") == ["127.0.0.1"]
    agent = observer.catalog.snapshot.select(agent_id="echo-1")[0]
    assert agent.health.type == "http" and agent.health.url == f"http://127.0.0.1:{http_agent.port}/health"
    assert agent.health.interval == INTERVAL

    # Nothing changed: several checks, no write.
    revision, checks = observer.catalog.snapshot.revision, http_agent.checks
    await eventually(lambda: http_agent.checks >= checks + 4, 4 * INTERVAL + SLACK, "more checks")
    assert observer.catalog.snapshot.revision == revision

    http_agent.status = 500
    await eventually(lambda: _empty(observer), THRESHOLD * INTERVAL + 1 + SLACK, "the failing agent to leave DNS")
    assert status_in(observer, "echo-1") == UNHEALTHY
    http_agent.status = 200
    await eventually(lambda: answers(observer, "echo.agents.local"), 2 * INTERVAL + 1 + SLACK, "recovery")
    assert status_in(observer, "echo-1") == HEALTHY


@pytest.mark.parametrize("kind", ["tcp", "grpc"])
async def test_tcp_and_grpc_agents(make_server: Callable[..., Any], kind: str) -> None:
    live = await start_target(kind)
    try:
        await make_server(agent=agent_section(live.port, health={"type": kind}), health_check=checking())
        observer = await make_server()
        await eventually(lambda: status_in(observer, "echo-1") == HEALTHY, 10 + SLACK, "registration")
        assert observer.catalog.snapshot.select(agent_id="echo-1")[0].health.type == kind
        await live.set_healthy(False)
        await eventually(lambda: status_in(observer, "echo-1") == UNHEALTHY, THRESHOLD * INTERVAL + 1 + SLACK,
                       "the unhealthy status")
        await live.set_healthy(True)
        await eventually(lambda: status_in(observer, "echo-1") == HEALTHY, 2 * INTERVAL + 1 + SLACK, "recovery")
    finally:
        await live.check.close()
        await live.stop()


async def _empty(server: Server) -> bool:
    return await answers(server, "echo.agents.local") == []


async def test_lost_lease_registers_again_with_current_health(
        make_server: Callable[..., Any], http_agent: HttpAgent, etcd: EtcdProcess) -> None:
    local = await make_server(agent=agent_section(http_agent.port, ttl="3s"), health_check=checking())
    observer = await make_server()
    await eventually(lambda: status_in(observer, "echo-1") == HEALTHY, 10 + SLACK, "registration")
    http_agent.status = 500
    await eventually(lambda: status_in(observer, "echo-1") == UNHEALTHY, THRESHOLD * INTERVAL + 1 + SLACK,
                   "the unhealthy status")
    registration = local.local_agent.registration
    old_lease = registration.lease_id
    revision = observer.catalog.snapshot.revision
    etcd.ctl("lease", "revoke", f"{old_lease:x}")
    await eventually(lambda: registration.lease_id != old_lease and status_in(observer, "echo-1") is not None
                   and observer.catalog.snapshot.revision > revision + 1, 3 + SLACK, "re-registration")
    assert status_in(observer, "echo-1") == UNHEALTHY, "re-registered with a stale status"


async def test_etcd_outage_longer_than_ttl_then_registered_again(
        private_etcd: EtcdProcess, make_server: Callable[..., Any], http_agent: HttpAgent) -> None:
    ttl = 3.0
    owner = await make_server(private_etcd.endpoint, agent=agent_section(http_agent.port, ttl=f"{ttl}s"),
                              health_check=checking())
    observer = await make_server(private_etcd.endpoint)
    await eventually(lambda: status_in(observer, "echo-1") == HEALTHY, 10 + SLACK, "registration")
    private_etcd.stop()
    await asyncio.sleep(ttl + 2)  # the outage outlasts the lease: that is the case under test
    # The agent fails while etcd is away: the re-registration must carry that, not the old status.
    http_agent.status = 500
    await eventually(lambda: owner.local_agent.describe()["status"] == UNHEALTHY, THRESHOLD * INTERVAL + 10 + SLACK,
                     "the owner's checks saw the failure")
    private_etcd.start()
    await eventually(lambda: status_in(observer, "echo-1") == UNHEALTHY, 20 + SLACK,
                   "the agent registered again with its current status")
    http_agent.status = 200
    await eventually(lambda: status_in(observer, "echo-1") == HEALTHY, 2 * INTERVAL + 1 + SLACK, "recovery")
    assert "echo-1" in private_etcd.ctl("get", "--prefix", "--keys-only", "/")


def _config(tmp_path: Path, drain_period: float) -> str:
    path = tmp_path / "sidecar.yaml"
    path.write_text("service_discovery:\n  health_check:\n"
                    f"    interval: {INTERVAL}\n    timeout: 0.5\n    drain_period: {drain_period}\n")
    return str(path)


def _run_args(etcd: EtcdProcess, prefix: str, config: str, port: int, agent_id: str, ttl: str) -> list[str]:
    return ["--config", config, "--etcd-endpoints", etcd.endpoint, "--prefix", prefix,
            "--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
            "--grpc-listen", "127.0.0.1:0", "--upstream-dns", "none", "--loop", "asyncio",
            "--agent-name", "echo", "--agent-id", agent_id, "--agent-address", "127.0.0.1",
            "--agent-port", str(port), "--agent-capability", "echo", "--agent-ttl", ttl]


async def registered(child: SidecarProcess, observer: Server, agent_id: str) -> None:
    try:
        await eventually(lambda: status_in(observer, agent_id) == HEALTHY, 20 + SLACK, "registration")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; exit code {child.returncode()}; log:\n{child.log()}") from None


async def test_sigkill_expires_within_ttl(make_server: Callable[..., Any], http_agent: HttpAgent,
                                          etcd: EtcdProcess, prefix: str, tmp_path: Path) -> None:
    ttl = 3.0
    observer = await make_server()
    child = SidecarProcess(_run_args(etcd, prefix, _config(tmp_path, 1.0), http_agent.port, "killed-1", "3s"),
                           str(tmp_path / "sidecar.log")).start()
    try:
        await registered(child, observer, "killed-1")
        child.signal(signal.SIGKILL)
        await eventually(lambda: status_in(observer, "killed-1") is None, ttl + 1 + SLACK, "the lease to expire")
    finally:
        child.cleanup()


async def test_sigterm_drains_deregisters_and_exits_zero(make_server: Callable[..., Any], http_agent: HttpAgent,
                                                         etcd: EtcdProcess, prefix: str, tmp_path: Path) -> None:
    observer = await make_server()
    seen: list[str | None] = []
    observer.catalog.subscribe(lambda snapshot, events: seen.append(status_in(observer, "term-1")))
    # A TTL of 30 s: leaving within a few seconds can only be the drain and revoke, not expiry.
    child = SidecarProcess(_run_args(etcd, prefix, _config(tmp_path, 1.0), http_agent.port, "term-1", "30s"),
                           str(tmp_path / "sidecar.log")).start()
    try:
        await registered(child, observer, "term-1")
        assert await answers(observer, "echo.agents.local") == ["127.0.0.1"]
        child.signal(signal.SIGTERM)
        await eventually(lambda: _empty(observer), 1 + SLACK, "the draining agent to leave DNS")
        await eventually(lambda: status_in(observer, "term-1") is None, 1.0 + 1 + SLACK, "the lease revoke")
        await eventually(lambda: child.returncode() is not None, 10 + SLACK, "the sidecar to exit")
        assert child.returncode() == 0, child.log()
        # Published unhealthy (draining) before it was deleted.
        assert seen[-2:] == [UNHEALTHY, None], seen
        assert "draining" in child.log() and "deregistered" in child.log()
    finally:
        child.cleanup()


async def test_pod_name_is_the_default_id(make_server: Callable[..., Any], http_agent: HttpAgent,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "echo-7")
    await make_server(agent=agent_section(http_agent.port, agent_id=""), health_check=checking())
    observer = await make_server()
    await eventually(lambda: status_in(observer, "echo-7") == HEALTHY, 10 + SLACK, "registration under POD_NAME")


async def test_an_unexpected_failure_restarts_the_lifecycle(make_server: Callable[..., Any], http_agent: HttpAgent,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.errors import CardError
    from sidecar.health import agent as local_agent

    calls = []

    async def flaky_discovery(port: int, timeout: float, host: str = "127.0.0.1", **_: Any) -> Any:
        calls.append(port)
        if len(calls) == 1:
            raise RuntimeError("a bug that escaped")
        raise CardError(f"http://127.0.0.1:{port}", "not found (HTTP 404)", kind="missing")

    monkeypatch.setattr(local_agent.a2a, "discover_card", flaky_discovery)
    section = agent_section(http_agent.port)
    del section["capabilities"]  # no capabilities: the card is looked for after the first pass
    await make_server(agent=section, health_check=checking())
    observer = await make_server()
    await eventually(lambda: status_in(observer, "echo-1") == HEALTHY, 10 + SLACK, "registration after the restart")
    assert len(calls) == 2
