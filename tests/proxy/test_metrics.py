"""Per-request metrics are tallied in plain numbers and folded into Prometheus on flush."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from sidecar.metrics import Metrics
from sidecar.proxy.http1 import Durations

VALUES = (0.0001, 0.0005, 0.0007, 0.003, 0.0049, 0.2, 20.0, 0.0005)


def samples(histogram: Histogram) -> dict[str, float]:
    return {f"{s.name}{sorted(s.labels.items())}": s.value for m in histogram.collect() for s in m.samples
            if not s.name.endswith("_created")}


def test_durations_flush_equals_observing_each_value() -> None:
    tallied = Metrics().proxy.request_seconds
    durations = Durations(tallied)
    assert durations.bounds is not None  # the fast tally, not the fallback
    direct = Histogram("d", "d", buckets=durations.bounds[:-1], registry=CollectorRegistry())
    for value in VALUES:
        durations.observe(value)
        direct.observe(value)
    assert samples(tallied)["sidecar_proxy_request_duration_seconds_count[]"] == 0  # nothing until flush
    durations.flush()
    durations.flush()  # a second flush adds nothing
    got = {k.replace("sidecar_proxy_request_duration_seconds", "d"): v for k, v in samples(tallied).items()}
    assert got.keys() == samples(direct).keys()
    for key, value in samples(direct).items():
        assert abs(got[key] - value) < 1e-12, key


def test_durations_fallback_without_histogram_internals() -> None:
    observed: list[float] = []

    class Plain:
        def observe(self, value: float) -> None:
            observed.append(value)

    durations = Durations(Plain())  # type: ignore[arg-type]
    assert durations.bounds is None
    for value in VALUES:
        durations.observe(value)
    durations.flush()
    assert observed == list(VALUES)
