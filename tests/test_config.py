"""config.py: every section's bad values are named with their key; restart-only keys; diffs (no I/O)."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from sidecar.config import HostPort, Settings, build, changes, to_document
from sidecar.dynamic import validate_document
from sidecar.errors import ConfigError
from sidecar.model import parse_duration

# (document, the dotted key the error names, a piece of its reason)
BAD = [
    ({"etcd": {"endpoints": ["ftp://x:1"]}}, "etcd.endpoints", "http://host:port"),
    ({"etcd": {"endpoints": ["https://x:1", "http://y:1"]}}, "etcd.endpoints", "mixes"),
    ({"etcd": {"ca_file": "/ca.pem"}}, "etcd.ca_file", "https://"),
    ({"etcd": {"endpoints": ["https://x:1"], "cert_file": "/c.pem"}}, "etcd.key_file", "both"),
    ({"etcd": {"username": "root"}}, "etcd.password", "both"),
    ({"etcd": {"endpoints": ["http://x:port"]}}, "etcd.endpoints", "bad port"),
    ({"etcd": {"endpoints": ["http://x:2379/v3"]}}, "etcd.endpoints", "without a path"),
    ({"etcd": {"endpoints": []}}, "etcd.endpoints", "at least one"),
    ({"etcd": {"request_timeout": "fast"}}, "etcd.request_timeout", "duration"),
    ({"etcd": {"dial_timeout": "0s"}}, "etcd.dial_timeout", "at least"),
    ({"registry": {"default_ttl": "1s"}}, "registry.default_ttl", "at least 2"),
    ({"registry": {"default_ttl": "10s", "refresh_interval": "10s"}}, "registry.refresh_interval", "shorter"),
    ({"health_check": {"interval": "6s"}}, "health_check.interval", "at most 5"),
    ({"health_check": {"failure_threshold": 0}}, "health_check.failure_threshold", "at least 1"),
    ({"health_check": {"panic": "maybe"}}, "health_check.panic", "true or false"),
    ({"health_check": {"outlier_detection": {"base_ejection_time": "60s", "max_ejection_time": "30s"}}},
     "health_check.outlier_detection.max_ejection_time", "at least base_ejection_time"),
    ({"health_check": {"outlier_detection": {"max_ejection_share": 2}}},
     "health_check.outlier_detection.max_ejection_share", "at most 1"),
    ({"load_balancer": {"algorithm": "random"}}, "load_balancer.algorithm", "one of"),
    ({"load_balancer": {"per_capability": {"chat": "fastest"}}}, "load_balancer.per_capability.chat", "one of"),
    ({"load_balancer": {"per_capability": {" ": "round_robin"}}}, "load_balancer.per_capability", "capability"),
    ({"load_balancer": {"circuit_breaker": {"failure_statuses": [700]}}},
     "load_balancer.circuit_breaker.failure_statuses", "HTTP statuses"),
    ({"load_balancer": {"circuit_breaker": {"timeout": -1}}}, "load_balancer.circuit_breaker.timeout", "duration"),
    ({"load_balancer": {"retries": {"attempts": 11}}}, "load_balancer.retries.attempts", "at most 10"),
    ({"load_balancer": {"retries": {"budget": "lots"}}}, "load_balancer.retries.budget", "number"),
    ({"dns": {"listen": "nowhere"}}, "dns.listen", "HOST:PORT"),
    ({"dns": {"listen": ":53"}}, "dns.listen", "needs a host"),
    ({"dns": {"listen": "127.0.0.1:99999"}}, "dns.listen", "0 to 65535"),
    ({"dns": {"upstreams": "foo:bar"}}, "dns.upstreams[0]", "0 to 65535"),
    ({"dns": {"upstreams": ["resolver.example:53"]}}, "dns.upstreams[0]", "IP address"),
    ({"dns": {"upstreams": ["none", "10.0.0.1"]}}, "dns.upstreams", "stands alone"),
    ({"dns": {"ttl": -1}}, "dns.ttl", "at least 0"),
    ({"dns": {"a_mode": "proxy"}, "proxy": {"listen": "0.0.0.0:15001"}}, "dns.a_mode", "specific IP"),
    ({"dns": {"max_udp_payload": 100}}, "dns.max_udp_payload", "at least 512"),
    ({"dns": {"max_udp_payload": 65535}}, "dns.max_udp_payload", "at most 4096"),
    ({"proxy": {"listen": "[::1]"}}, "proxy.listen", "needs a port"),
    ({"proxy": {"connect_timeout": "soon"}}, "proxy.connect_timeout", "duration"),
    ({"proxy": {"max_concurrency": 0}}, "proxy.max_concurrency", "at least 1"),
    ({"proxy": {"passthrough": 3}}, "proxy.passthrough", "true or false"),
    ({"sticky": {"cookie_max_age": "forever"}}, "sticky.cookie_max_age", "duration"),
    ({"admin": {"listen": "127.0.0.1:15000"}, "grpc": {"listen": "127.0.0.1:15000"}}, "grpc.listen", "also"),
    ({"admin": {"token": 5}}, "admin.token", "string"),
    ({"agent": {"name": "a"}}, "agent.port", "port"),
    ({"agent": {"name": "a", "port": 70000}}, "agent.port", "at most 65535"),
    ({"agent": {"name": "a", "port": 80, "address": "not valid"}}, "agent.address", ""),
    ({"agent": {"name": "a", "port": 80, "health": {"type": "http", "url": "tcp://x:1"}}}, "agent.health.url",
     "http://"),
    ({"agent": {"name": "a", "port": 80, "health": {"type": "icmp"}}}, "agent.health.type", "one of"),
    ({"agent": {"metadata": "k"}}, "agent.metadata", "k=v"),
    ({"tracing": {"otlp_endpoint": "collector:4318"}}, "tracing.otlp_endpoint", "OTLP/HTTP URL"),
    ({"tracing": {"sample_ratio": 1.5}}, "tracing.sample_ratio", "at most 1"),
    ({"log_level": "loud"}, "log_level", "one of"),
    ({"log_format": "xml"}, "log_format", "one of"),
    ({"etcd": {"prefix": "noslash/"}}, "etcd.prefix", "no trailing /"),
    ({"etcd": {"prefix": "/trailing/"}}, "etcd.prefix", "no trailing /"),
    ({"etcd": {"prefix": "/a//b"}}, "etcd.prefix", "[/]name[/name...]"),
    ({"etcd": {"prefix": "/with space"}}, "etcd.prefix", "[/]name[/name...]"),
    ({"dns": {"domain": ""}}, "dns.domain", "1 to 253"),
    ({"dns": {"domain": "bad domain!"}}, "dns.domain", "DNS name"),
    ({"dns": {"domain": "agents..local"}}, "dns.domain", "labels of 1 to 63"),
    ({"dns": {"domain": "-agents.local"}}, "dns.domain", "inner hyphens"),
    ({"dns": {"domain": "a" * 64 + ".local"}}, "dns.domain", "1 to 63"),
    ({"dns": {"domain": ".".join(["a" * 60] * 5)}}, "dns.domain", "253"),
    ({"load_balancer": {"hash_header": "bad header"}}, "load_balancer.hash_header", "RFC 7230"),
    ({"load_balancer": {"hash_header": ""}}, "load_balancer.hash_header", "not empty"),
    ({"load_balancer": {"hash_cookie": "a=b"}}, "load_balancer.hash_cookie", "RFC 6265"),
    ({"sticky": {"cookie": "a;b=c\r\nX: y"}}, "sticky.cookie", "RFC 6265"),
    ({"sticky": {"cookie": ""}}, "sticky.cookie", "not empty"),
    ({"sticky": {"header": ""}}, "sticky.header", "not empty"),
    ({"sticky": {"header": "X-Session:\r\n"}}, "sticky.header", "RFC 7230"),
    ({"sticky": {"enabled": "sometimes"}}, "sticky.enabled", "true or false"),
    ({"a2a": {"max_body": 100}}, "a2a.max_body", "at least 1024"),
    ({"a2a": {"max_card_bytes": 32 << 20}}, "a2a.max_card_bytes", "at most"),
    ({"a2a": {"card_refresh": "500ms"}}, "a2a.card_refresh", "at least 1"),
    ({"a2a": {"ttl": "for a while"}}, "a2a.ttl", "duration"),
    ({"a2a": {"max_tasks": 1}}, "a2a.max_tasks", "at least 16"),
    ({"a2a": {"max_contexts": "many"}}, "a2a.max_contexts", "integer"),
    ({"a2a": {"max_bodies": 1}}, "a2a.max_bodies", "unknown key"),
    ({"dns": {"tll": 5}}, "dns.tll", "unknown key"),
    ({"dns": [1]}, "dns", "mapping"),
]


@pytest.mark.parametrize(("document", "key", "reason"), BAD, ids=[b[1] + ":" + str(i) for i, b in enumerate(BAD)])
def test_every_bad_value_is_named(document: dict, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(Settings, document)
    assert caught.value.key == key, str(caught.value)
    assert reason in caught.value.reason
    node: object = document
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is not None and not isinstance(node, dict):
        # The value refused: the one given, one item of a list, or a duration in seconds.
        named = caught.value.value
        assert named == node or (isinstance(node, list) and named in node) or \
            (isinstance(node, str) and named == parse_duration(node)), f"{named!r} is not the value given ({node!r})"
        assert repr(named) in str(caught.value)


def test_names_that_are_tokens_and_domains_that_are_dns_names_pass() -> None:
    settings = build(Settings, {"sticky": {"cookie": "__Host-pin", "header": "X-Session-ID"},
                                "load_balancer": {"hash_header": "x-user", "hash_cookie": "uid"},
                                "dns": {"domain": "Agents.Example-1.local.", "max_udp_payload": 4096},
                                "etcd": {"prefix": "/prod/team-a"}})
    assert settings.sticky.cookie == "__Host-pin" and settings.dns.domain == "Agents.Example-1.local."
    assert build(Settings, {"load_balancer": {"hash_cookie": ""}}).load_balancer.hash_cookie == ""
    assert build(Settings, {"etcd": {"prefix": "prod"}}).etcd.prefix == "prod"  # kept as given


def test_defaults_are_valid_and_never_shared() -> None:
    one, two = Settings(), Settings()
    assert one == two
    assert one.agent.metadata is not two.agent.metadata
    assert isinstance(one.agent.metadata, MappingProxyType), "settings are inert: nested mappings are read-only"
    with pytest.raises(TypeError):
        one.agent.metadata["k"] = "v"  # type: ignore[index]
    assert build(Settings, to_document(one)) == one, "a settings document round-trips"


def test_host_port_is_the_one_parser() -> None:
    assert HostPort.parse("127.0.0.1:53") == ("127.0.0.1", 53)
    assert HostPort.parse("[::1]:15053") == ("::1", 15053)
    assert str(HostPort.parse("[::1]:15053")) == "[::1]:15053"
    assert HostPort.parse("10.0.0.1", default_port=53) == ("10.0.0.1", 53)
    assert HostPort.parse("fe80::1", default_port=53) == ("fe80::1", 53)
    for bad in ("", "host", "[::1", "a:b:c", "h:-1"):
        with pytest.raises(ConfigError):
            HostPort.parse(bad, "x")


def test_changes_say_which_keys_need_a_restart() -> None:
    old = Settings()
    new = build(Settings, {"dns": {"ttl": 9, "listen": "127.0.0.1:5353"}, "load_balancer": {"algorithm": "round_robin"},
                           "etcd": {"prefix": "/p"}, "agent": {"name": "a", "port": 80}})
    assert dict(changes(old, new)) == {"dns.ttl": False, "dns.listen": True, "load_balancer.algorithm": False,
                                       "etcd.prefix": True, "agent.name": True, "agent.port": True}


def test_the_shared_document_may_not_set_per_sidecar_sections() -> None:
    for section in ("etcd", "agent"):
        with pytest.raises(ConfigError) as caught:
            validate_document({section: {}})
        assert caught.value.key == section and "per sidecar" in caught.value.reason
    layered = validate_document({"dns": {"ttl": 30}}, build(Settings, {"dns": {"negative_ttl": 7}}))
    assert (layered.dns.ttl, layered.dns.negative_ttl) == (30, 7), "the document goes over the base, key by key"
