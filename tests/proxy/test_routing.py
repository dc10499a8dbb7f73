"""Host -> Route, as a table."""

from __future__ import annotations

import pytest

from sidecar.errors import UnknownTarget
from sidecar.proxy.routing import Route, route, split_host

ZONE = "agents.local"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("chat.agents.local", Route("capability", "chat.agents.local", 80, capability="chat")),
        ("Chat.Agents.Local.:8080", Route("capability", "chat.agents.local", 8080, capability="chat")),
        ("gpu.chat.agents.local", Route("capability", "gpu.chat.agents.local", 80, capability="chat", tag="gpu")),
        ("planner.service.agents.local", Route("name", "planner.service.agents.local", 80, name="planner")),
        ("a-1.id.agents.local", Route("id", "a-1.id.agents.local", 80, agent_id="a-1")),
        ("example.com", Route("external", "example.com", 80)),
        ("127.0.0.1:9000", Route("external", "127.0.0.1", 9000)),
        ("[::1]:9000", Route("external", "::1", 9000)),
        ("agents.local.example.com", Route("external", "agents.local.example.com", 80)),
    ],
)
def test_route(host: str, expected: Route) -> None:
    assert route(host, ZONE) == expected


@pytest.mark.parametrize("host", ["agents.local", "a.b.c.agents.local"])
def test_unknown_in_zone_forms(host: str) -> None:
    with pytest.raises(UnknownTarget):
        route(host, ZONE)


@pytest.mark.parametrize("host", ["", ":80", "a:b", "a:70000", "[::1"])
def test_bad_hosts(host: str) -> None:
    with pytest.raises(ValueError):
        split_host(host)


def test_connect_default_port() -> None:
    assert route("chat.agents.local", ZONE, default_port=443).port == 443


def test_keys_separate_targets() -> None:
    keys = {route(h, ZONE).key for h in ("chat.agents.local", "gpu.chat.agents.local", "chat.service.agents.local",
                                         "chat.id.agents.local", "example.com")}
    assert len(keys) == 5
