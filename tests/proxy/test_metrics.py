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
    direct = Histogram("sidecar_proxy_request_duration_seconds", "d", buckets=ProxyMetrics.DURATION_BUCKETS,
                       registry=direct_registry)
    for value in VALUES:
        metrics.proxy.observe_duration(value)
        direct.observe(value)
    name = "sidecar_proxy_request_duration_seconds"
    assert lines(metrics.exposition(), name) == lines(generate_latest(direct_registry), name)


def test_request_and_attempt_counters_are_exposed_with_their_labels() -> None:
    metrics = Metrics()
    metrics.proxy.requests[("capability", "ok")] += 2
    metrics.proxy.requests[("id", "upstream_error")] += 1
    metrics.proxy.attempts["success"] += 3
    metrics.proxy.pool_reuses += 4
    metrics.proxy.connections += 1
    text = metrics.exposition().decode()
    assert 'sidecar_proxy_requests_total{kind="capability",outcome="ok"} 2.0' in text
    assert 'sidecar_proxy_requests_total{kind="id",outcome="upstream_error"} 1.0' in text
    assert 'sidecar_proxy_upstream_attempts_total{outcome="success"} 3.0' in text
    assert "sidecar_proxy_upstream_connection_reuses_total 4.0" in text
    assert "sidecar_proxy_client_connections 1.0" in text
