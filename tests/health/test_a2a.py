"""A2A agent cards: both shapes, bad cards named clearly, and a sidecar that reads its agent's card."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar import cards
from sidecar.errors import CardError
from sidecar.health import a2a
from sidecar.model import HEALTHY, parse_agent

from ..etcd_process import EtcdProcess
from ..waiting import eventually
from .conftest import HttpAgent, answers

V1 = {
    "name": "Travel Planner",
    "description": "plans trips",
    "version": "2.1.0",
    "provider": {"organization": "Example Org", "url": "https://example.org"},
    "supportedInterfaces": [
        {"url": "http://127.0.0.1:9999/a2a/v1", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
        {"url": "http://127.0.0.1:9998/grpc", "protocolBinding": "GRPC", "protocolVersion": "1.0"},
    ],
    "skills": [
        {"id": "plan_trip", "name": "Plan", "description": "d", "tags": ["Travel", "Multi Step"]},
        {"id": "book-hotel", "name": "Book", "description": "d", "tags": ["travel", "Hotels & Stays"]},
    ],
}
V03 = {
    "name": "weather",
    "version": "0.3.1",
    "protocolVersion": "0.3.0",
    "url": "http://localhost:7000/",
    "preferredTransport": "JSONRPC",
    "skills": [{"id": "forecast", "name": "Forecast", "description": "d", "tags": ["weather"]}],
}


def test_v1_card() -> None:
    card = cards.parse_card(V1, "test")
    assert (card.shape, card.url, card.binding, card.port) == ("1.0", "http://127.0.0.1:9999/a2a/v1", "JSONRPC", 9999)
    assert card.capabilities() == ("plan_trip", "book-hotel")
    assert card.tag_labels() == ("travel", "multi-step", "hotels---stays")
    assert card.metadata() == {
        "a2a.name": "Travel Planner", "a2a.card": "1.0", "a2a.url": "http://127.0.0.1:9999/a2a/v1",
        "a2a.version": "2.1.0", "a2a.binding": "JSONRPC", "a2a.protocol_version": "1.0",
        "a2a.provider": "Example Org", "a2a.provider_url": "https://example.org",
        "a2a.tags": json.dumps(["Travel", "Multi Step", "travel", "Hotels & Stays"]),
    }


def test_v03_card() -> None:
    card = cards.parse_card(V03, "test")
    assert (card.shape, card.url, card.port, card.protocol_version) == ("0.3", "http://localhost:7000/", 7000, "0.3.0")
    assert card.capabilities() == ("forecast",)


def test_merge_keeps_flags_and_makes_a_valid_agent() -> None:
    base = {"name": "", "id": "tp-1", "address": "127.0.0.1", "port": 0, "version": "", "protocol": "http",
            "capabilities": [], "tags": ["mine"], "metadata": {"team": "x", "a2a.name": "flag wins"}}
    merged = cards.merge_card(base, cards.parse_card(V1, "t"), explicit=())
    agent = parse_agent(merged, strict=True)
    assert (agent.name, agent.port, agent.version) == ("travel-planner", 9999, "2.1.0")
    assert agent.capabilities == ("plan_trip", "book-hotel")
    assert agent.tags == ("mine", "travel", "multi-step", "hotels---stays")
    assert agent.metadata["team"] == "x" and agent.metadata["a2a.name"] == "flag wins"
    kept = cards.merge_card({**base, "name": "tp", "port": 80, "capabilities": ["chat"]}, cards.parse_card(V1, "t"),
                          explicit=("name", "port", "capabilities"))
    assert (kept["name"], kept["port"], kept["capabilities"]) == ("tp", 80, ["chat"])


@pytest.mark.parametrize(("card", "reason"), [
    ([], "must be a JSON object"),
    ({"url": "http://h:1/"}, "name is missing"),
    ({"name": "x"}, "neither supportedInterfaces (v1.0) nor url (v0.2/v0.3)"),
    ({"name": "x", "supportedInterfaces": []}, "supportedInterfaces must be a non-empty list"),
    ({"name": "x", "supportedInterfaces": [{"protocolBinding": "JSONRPC"}]}, "supportedInterfaces[0].url is missing"),
    ({"name": "x", "url": "not a url"}, "is not an absolute URL"),
    ({"name": "x", "url": "http://h:1/", "skills": {}}, "skills must be a list"),
    ({"name": "x", "url": "http://h:1/", "skills": [{"name": "no id"}]}, "skills[0].id is missing"),
    ({"name": "x", "url": "http://h:1/", "skills": [{"id": "a", "tags": "t"}]}, "skills[0].tags must be a list"),
    ({"name": 5, "url": "http://h:1/"}, "name must be a non-empty string"),
])
def test_malformed_cards_name_the_field(card: Any, reason: str) -> None:
    with pytest.raises(CardError) as caught:
        cards.parse_card(card, "card.json")
    assert reason in str(caught.value) and "card.json" in str(caught.value)


@pytest.mark.asyncio
async def test_files_missing_and_not_json(tmp_path: Path) -> None:
    with pytest.raises(CardError) as missing:
        await a2a.load_card(str(tmp_path / "none.json"), 1.0)
    assert missing.value.missing
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CardError, match="is not valid JSON"):
        await a2a.load_card(str(bad), 1.0)
    good = tmp_path / "card.json"
    good.write_text(json.dumps(V03))
    assert (await a2a.read_card(f"file://{good}", 1.0)).name == "weather"


@pytest.mark.asyncio
async def test_discovery_prefers_agent_card_json_then_agent_json(http_agent: HttpAgent) -> None:
    with pytest.raises(CardError) as missing:
        await a2a.discover_card(http_agent.port, 2.0)
    assert missing.value.missing and "agent-card.json" in str(missing.value) and "agent.json" in str(missing.value)
    http_agent.cards["/.well-known/agent.json"] = V03
    assert (await a2a.discover_card(http_agent.port, 2.0)).shape == "0.3"
    http_agent.cards["/.well-known/agent-card.json"] = V1
    assert (await a2a.discover_card(http_agent.port, 2.0)).shape == "1.0"
    http_agent.cards["/.well-known/agent-card.json"] = b"<html>"
    with pytest.raises(CardError, match="is not valid JSON"):
        await a2a.discover_card(http_agent.port, 2.0)


FAST = {"interval": 0.3, "timeout": 0.5, "drain_period": 0.1}


def _agent(port: int, **extra: Any) -> dict[str, Any]:
    return {"id": "card-1", "address": "127.0.0.1", "port": port, **extra}


@pytest.mark.etcd
@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "card"), [("/.well-known/agent-card.json", V1), ("/.well-known/agent.json", V03)])
async def test_sidecar_reads_the_served_card(make_server: Callable[..., Any], http_agent: HttpAgent,
                                             path: str, card: dict[str, Any]) -> None:
    http_agent.cards[path] = card
    await make_server(agent=_agent(http_agent.port, name="trip"), health_check=FAST)
    observer = await make_server()
    capability = card["skills"][0]["id"].replace("_", "-")
    await eventually(lambda: answers(observer, f"{capability}.agents.local"), 10, "the card's capability in DNS")
    agent = observer.catalog.snapshot.select(agent_id="card-1")[0]
    assert agent.name == "trip" and agent.port == http_agent.port and agent.health.status == HEALTHY
    assert agent.metadata["a2a.name"] == card["name"] and agent.version == card["version"]


@pytest.mark.etcd
@pytest.mark.asyncio
async def test_no_card_registers_from_flags(make_server: Callable[..., Any], http_agent: HttpAgent) -> None:
    local = await make_server(agent=_agent(http_agent.port, name="plain"), health_check=FAST)
    observer = await make_server()
    await eventually(lambda: observer.catalog.snapshot.select(agent_id="card-1"), 10, "registration")
    assert observer.catalog.snapshot.select(agent_id="card-1")[0].capabilities == ()
    assert "error" not in local.readiness()["local_agent"]


@pytest.mark.etcd
@pytest.mark.asyncio
async def test_malformed_card_file_is_an_error_and_the_sidecar_keeps_running(
        make_server: Callable[..., Any], http_agent: HttpAgent, tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    path.write_text(json.dumps({"name": "x", "skills": []}))
    local = await make_server(agent=_agent(http_agent.port, card=str(path)), health_check=FAST)
    observer = await make_server()
    await eventually(lambda: "error" in local.readiness()["local_agent"] and local.readiness()["ready"], 10,
                   "the card error, the sidecar ready")
    detail = local.readiness()
    assert detail["ready"] and "neither supportedInterfaces" in detail["local_agent"]["error"]
    assert not detail["local_agent"]["registered"]
    assert local.metrics.health.card_errors.labels("invalid")._value.get() >= 1
    # Fixed on disk: read on the next attempt, registered under the card's name.
    path.write_text(json.dumps(V03))
    await eventually(lambda: answers(observer, "forecast.agents.local"), 10, "registration from the fixed card")
    assert observer.catalog.snapshot.select(agent_id="card-1")[0].name == "weather"
    assert "error" not in local.readiness()["local_agent"]


@pytest.mark.etcd
@pytest.mark.asyncio
@pytest.mark.parametrize(("content", "reason"), [
    (json.dumps({"name": "x", "skills": []}), "invalid"),  # parses as JSON, not as a card
    ("{not json", "invalid"),
    (json.dumps({**V03, "description": "x" * 5000}), "too_large"),
])
async def test_a_refused_named_card_does_not_keep_a_named_agent_out(
        make_server: Callable[..., Any], http_agent: HttpAgent, tmp_path: Path, content: str, reason: str) -> None:
    """With --agent-name (and a port) the card only adds to the flags: refused, the agent registers without it."""
    path = tmp_path / "card.json"
    path.write_text(content)
    local = await make_server(agent=_agent(http_agent.port, name="named", capabilities=["chat"], card=str(path)),
                              health_check=FAST, a2a={"max_card_bytes": 4096})
    observer = await make_server()
    await eventually(lambda: observer.catalog.snapshot.select(agent_id="card-1"), 10, "the agent registered")
    agent = observer.catalog.snapshot.select(agent_id="card-1")[0]
    assert (agent.name, agent.capabilities, agent.port) == ("named", ("chat",), http_agent.port)
    assert "a2a.card" not in agent.metadata and observer.cards.of("named", "card-1") is None
    detail = local.readiness()["local_agent"]
    assert detail["registered"] and str(path) in detail["error"]
    assert local.metrics.health.card_errors.labels(reason)._value.get() >= 1


@pytest.mark.etcd
@pytest.mark.asyncio
async def test_a_named_card_url_refused_at_start_is_stored_once_it_reads(
        make_server: Callable[..., Any], http_agent: HttpAgent) -> None:
    card_url = f"http://127.0.0.1:{http_agent.port}/.well-known/agent-card.json"
    http_agent.cards["/.well-known/agent-card.json"] = b"<html>not a card</html>"
    local = await make_server(agent=_agent(http_agent.port, name="trip", card=card_url), health_check=FAST,
                              a2a={"card_refresh": 1})
    observer = await make_server()
    await eventually(lambda: observer.catalog.snapshot.select(agent_id="card-1"), 10, "registered from the flags")
    assert observer.catalog.snapshot.select(agent_id="card-1")[0].capabilities == ()
    assert "is not valid JSON" in local.readiness()["local_agent"]["error"]
    http_agent.cards["/.well-known/agent-card.json"] = V1  # fixed: the next read stores it
    await eventually(lambda: observer.cards.of("trip", "card-1") is not None, 15, "the card in the registry")
    await eventually(lambda: [a.id for a in observer.catalog.snapshot.select(capability="plan-trip")] == ["card-1"],
                     15, "the card's capabilities on the record")
    assert "error" not in local.readiness()["local_agent"]


@pytest.mark.etcd
@pytest.mark.asyncio
async def test_a_card_that_must_give_the_port_is_waited_for(
        make_server: Callable[..., Any], http_agent: HttpAgent, tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    path.write_text("{not json")
    local = await make_server(agent={"id": "card-1", "address": "127.0.0.1", "name": "trip", "card": str(path)},
                              health_check=FAST)
    observer = await make_server()
    await eventually(lambda: "error" in local.readiness()["local_agent"], 10, "the card error")
    assert not local.readiness()["local_agent"]["registered"]
    path.write_text(json.dumps({**V03, "url": f"http://127.0.0.1:{http_agent.port}/"}))
    await eventually(lambda: answers(observer, "forecast.agents.local"), 10, "registration from the fixed card")
    agent = observer.catalog.snapshot.select(agent_id="card-1")[0]
    assert (agent.name, agent.port) == ("trip", http_agent.port)


def _register(etcd: EtcdProcess, prefix: str, card: str, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "register", "--etcd-endpoints", etcd.endpoint, "--prefix", prefix,
         "--name", "trip", "--id", "trip-1", "--address", "127.0.0.1", "--port", "9999", "--card", card, *options],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.etcd
def test_register_command_reads_a_card(etcd: EtcdProcess, prefix: str, tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    path.write_text(json.dumps(V1))
    child = _register(etcd, prefix, str(path))
    try:
        assert child.stdout is not None
        assert child.stdout.readline().startswith("registered ")
        stored = json.loads(etcd.ctl("get", "--print-value-only", f"{prefix}/services/trip/trip-1"))
        assert stored["capabilities"] == ["plan_trip", "book-hotel"] and stored["metadata"]["a2a.card"] == "1.0"
        # The card itself is in the registry, on the agent's lease, as a sidecar stores its local agent's.
        card = json.loads(etcd.ctl("get", f"{prefix}/cards/trip/trip-1", "-w", "json"))["kvs"][0]
        record = json.loads(etcd.ctl("get", f"{prefix}/services/trip/trip-1", "-w", "json"))["kvs"][0]
        assert base64.b64decode(card["value"]) == path.read_bytes() and card["lease"] == record["lease"]
        child.send_signal(signal.SIGINT)
        assert child.wait(20) == 0
        assert etcd.ctl("get", "--print-value-only", f"{prefix}/cards/trip/trip-1").strip() == ""
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    path.write_text("[]")
    bad = _register(etcd, prefix, str(path))
    output, _ = bad.communicate(timeout=30)
    assert bad.returncode == 1 and "A2A agent card" in output and "must be a JSON object" in output


@pytest.mark.etcd
def test_register_command_holds_cards_to_a2a_max_card_bytes(etcd: EtcdProcess, prefix: str, tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    path.write_text(json.dumps({**V1, "description": "x" * (70 << 10)}))  # over the 64 KiB default
    refused = _register(etcd, prefix, str(path))
    output, _ = refused.communicate(timeout=30)
    assert refused.returncode == 1 and "larger than 65536 bytes" in output
    path.write_text(json.dumps({**V1, "description": "x" * 5000}))
    config = tmp_path / "sidecar.yaml"
    config.write_text("a2a:\n  max_card_bytes: 4096\n")
    refused = _register(etcd, prefix, str(path), "--config", str(config))
    output, _ = refused.communicate(timeout=30)
    assert refused.returncode == 1 and "larger than 4096 bytes" in output
    assert etcd.ctl("get", "--print-value-only", f"{prefix}/services/trip/trip-1").strip() == ""
