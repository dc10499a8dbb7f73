"""The agent record: Go wire compatibility, labels, validation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.errors import ValidationError
from sidecar.model import Agent, decode_agent, label, parse_agent, parse_duration, parse_rfc3339

# What encoding/json writes for the original Go ServiceInstance (nil slices/maps as null).
GO_JSON = (
    b'{"id":"summarizer-1","name":"summarizer","version":"1.2.0","address":"10.1.2.3","port":8080,'
    b'"protocol":"http","tags":null,"metadata":null,"health":{"type":"http","url":"http://10.1.2.3:8080/health",'
    b'"interval":10000000000,"timeout":3000000000,"status":"healthy"},"capabilities":["summarize","Text_Gen"],'
    b'"register_time":"2024-05-01T10:20:30.123456789Z","ttl":30000000000}'
)


def test_go_encoded_json_decodes() -> None:
    agent = decode_agent(GO_JSON)
    assert agent.id == "summarizer-1"
    assert agent.health.interval == 10.0 and agent.health.timeout == 3.0
    assert agent.ttl == 30.0
    assert agent.tags == () and dict(agent.metadata) == {}
    assert agent.capability_labels == ("summarize", "text-gen")
    assert agent.weight == 100 and agent.zone == ""
    assert parse_rfc3339(agent.register_time).microsecond == 123456


def test_round_trip_writes_go_types() -> None:
    agent = decode_agent(GO_JSON)
    data = json.loads(agent.to_bytes())
    assert data["ttl"] == 30_000_000_000
    assert data["health"]["interval"] == 10_000_000_000
    assert data["tags"] == [] and data["metadata"] == {}
    assert decode_agent(agent.to_bytes()) == agent


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5s", 1.5), (2_000_000_000, 2.0),
     ("0", 0.0), ("250us", 0.00025)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "10", "s", "10x", "-5s", "5 s", True, None, [1], -1])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_labels() -> None:
    assert label("Text_Gen") == "text-gen"
    assert label("a.b c") == "a-b-c"
    assert label("ÜBER") == "-ber"


def _fields(data: dict[str, object]) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        parse_agent(data, strict=True)
    return {e.field: e.reason for e in info.value.errors}


def test_validation_names_every_bad_field() -> None:
    bad = _fields({"id": "x/y", "name": "", "address": "not an address!", "port": 70000,
                   "capabilities": ["ok", "", "service"], "tags": ["t" * 64], "ttl": "1s",
                   "weight": -1, "health": {"status": "sick", "interval": "soon"}, "colour": "blue"})
    assert set(bad) == {"id", "name", "address", "port", "capabilities", "tags", "ttl", "weight",
                        "health.status", "health.interval", "colour"}


def test_validation_accepts_a_minimal_agent() -> None:
    agent = parse_agent({"id": "a", "name": "n", "address": "::1", "port": 1}, strict=True)
    assert agent.ip is not None and agent.ip.version == 6
    assert agent.healthy  # no status: served, as Consul serves services without checks


def test_unhealthy_is_the_only_status_not_served() -> None:
    base = {"id": "a", "name": "n", "address": "127.0.0.1", "port": 1}
    for status, served in (("healthy", True), ("unknown", True), ("unhealthy", False)):
        assert parse_agent({**base, "health": {"status": status}}).healthy is served


def test_host_name_addresses_are_kept() -> None:
    agent = parse_agent({"id": "a", "name": "n", "address": "agent-0.example.svc", "port": 80})
    assert agent.ip is None


@given(st.binary(max_size=300))
def test_decode_never_raises_anything_but_validation(raw: bytes) -> None:
    try:
        agent = decode_agent(raw)
    except (ValueError, ValidationError):
        return
    assert isinstance(agent, Agent)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=5),
                    max_leaves=20))
def test_parse_agent_fuzz(data: object) -> None:
    try:
        parse_agent(data)
    except ValidationError:
        pass
