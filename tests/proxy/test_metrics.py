"""Per-request proxy metrics are plain numbers turned into Prometheus families at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from sidecar.metrics import Metrics, ProxyMetrics

VALUES = (0.0001, 0.0005, 0.0007, 0.003, 0.0049, 0.2, 20.0, 0.0005)


def lines(text: bytes, name: str) -> list[str]:
    return [line for line in text.decode().splitlines() if line.startswith(name) and "_created" not in line]


def test_duration_histogram_equals_a_prometheus_histogram_fed_each_value() -> None:
    metrics = Metrics()
    direct_registry = CollectorRegistry()
    direct = Histogram("sidecar_proxy_request_duration_seconds", "d", ["capability"],
                       buckets=ProxyMetrics.DURATION_BUCKETS, registry=direct_registry)
    direct.labels("-")  # requests naming no capability: always exported, first by label value
    for value in VALUES:
        metrics.proxy.observe_duration(value, "chat")
        direct.labels("chat").observe(value)
    name = "sidecar_proxy_request_duration_seconds"
    assert lines(metrics.exposition(), name) == lines(generate_latest(direct_registry), name)


def test_request_and_attempt_counters_are_exposed_with_their_labels() -> None:
    metrics = Metrics()
    metrics.proxy.requests[("capability", "chat", "ok")] += 2
    metrics.proxy.requests[("id", "-", "upstream_error")] += 1
    metrics.proxy.attempts["success"] += 3
    metrics.proxy.pool_reuses += 4
    metrics.proxy.connections += 1
    text = metrics.exposition().decode()
    assert 'sidecar_proxy_requests_total{capability="chat",kind="capability",outcome="ok"} 2.0' in text
    assert 'sidecar_proxy_requests_total{capability="-",kind="id",outcome="upstream_error"} 1.0' in text
    assert 'sidecar_proxy_upstream_attempts_total{outcome="success"} 3.0' in text
    assert "sidecar_proxy_upstream_connection_reuses_total 4.0" in text
    assert "sidecar_proxy_client_connections 1.0" in text


def test_capability_label_values_are_bounded() -> None:
    """The first MAX_CAPABILITIES capabilities get a value each; later ones, reserved words and (when asked
    not to make one) unknown ones share ``_other``; "" is ``-``. Whatever is asked, the series stay bounded."""
    proxy = ProxyMetrics(CollectorRegistry())
    limit = ProxyMetrics.MAX_CAPABILITIES
    assert proxy.of_capability("").capability == "-"
    assert proxy.of_capability("typo", new=False).capability == "_other" and "typo" not in proxy.capabilities
    for i in range(limit + 50):
        proxy.observe_duration(0.001, f"cap{i}")
    assert proxy.of_capability("cap0").capability == "cap0"
    assert proxy.of_capability(f"cap{limit - 1}").capability == f"cap{limit - 1}"
    assert proxy.of_capability(f"cap{limit}").capability == "_other"
    assert proxy.of_capability("_other") is proxy.of_capability("-") is proxy.of_capability(f"cap{limit + 9}")
    assert len(proxy.capabilities) == limit + 1  # and "" for "-"
    [durations] = [f for f in proxy.collect() if getattr(f, "name", "") == "sidecar_proxy_request_duration_seconds"]
    counts = {s.labels["capability"]: s.value for s in durations.samples if s.name.endswith("_count")}
    assert len(counts) == limit + 2 and counts["_other"] == 50 and counts["cap7"] == 1 and counts["-"] == 0


def test_breakers_are_counted_by_state_and_listed_per_agent_only_when_not_closed() -> None:
    metrics = Metrics()
    not_closed = {f"a{i:03}": "open" for i in range(ProxyMetrics.MAX_BREAKER_AGENTS + 20)} | {"h": "half_open"}
    metrics.proxy.breakers = lambda: (len(not_closed) + 5, not_closed)
    registry = metrics.collector_registry
    assert registry.get_sample_value("sidecar_proxy_breakers", {"state": "closed"}) == 5
    assert registry.get_sample_value("sidecar_proxy_breakers", {"state": "open"}) == 120
    assert registry.get_sample_value("sidecar_proxy_breakers", {"state": "half_open"}) == 1
    per_agent = [line for line in lines(metrics.exposition(), "sidecar_proxy_breaker_state{")]
    assert len(per_agent) == ProxyMetrics.MAX_BREAKER_AGENTS  # by agent id: a000..a099
    assert per_agent[0] == 'sidecar_proxy_breaker_state{agent="a000"} 1.0'
    assert registry.get_sample_value("sidecar_proxy_breaker_state", {"agent": "h"}) is None  # past the limit
