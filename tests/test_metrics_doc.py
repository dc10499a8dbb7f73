"""docs/metrics.md lists exactly the metric families /metrics exports, with their labels."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client import Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from sidecar.metrics import Metrics

from .metrics_doc import Family, busy_sidecar, differences, documented, exported, promql_name
from .waiting import eventually


def wrappers(metrics: Metrics) -> dict[str, MetricWrapperBase]:
    """The prometheus_client metric objects of every group of ``metrics``, by PromQL family name."""
    found = {}
    for group in vars(metrics).values():
        for metric in vars(group).values() if hasattr(group, "__dict__") else ():
            if isinstance(metric, MetricWrapperBase):
                family = metric.describe()[0]
                found[promql_name(family.name, family.type)] = metric
    return found


def probe_labels(metrics: Metrics, doc: dict[str, Family]) -> list[str]:
    """Give every labelled prometheus_client metric one child, with the label names the doc lists.

    ``labels(**names)`` raises unless the names are exactly the metric's, so this checks the
    labels of families that would otherwise show no sample in a fresh registry.
    """
    problems = []
    for name, metric in wrappers(metrics).items():
        if name in doc and doc[name].labels:
            try:
                metric.labels(**{label: "probe" for label in doc[name].labels})
            except ValueError:
                problems.append(f"{name} does not have the labels {sorted(doc[name].labels)} of docs/metrics.md")
    return problems


def test_every_family_of_the_registry_is_documented_with_its_labels() -> None:
    metrics = Metrics()
    doc = documented()
    problems = probe_labels(metrics, doc)
    found = exported(metrics.collector_registry.collect())
    problems += differences(doc, found)
    # Only a labelled family can be without samples here, so the doc must give it labels.
    problems += [f"{name} has labels, docs/metrics.md lists none" for name, family in found.items()
                 if family.labels is None and name in doc and not doc[name].labels]
    assert not problems, "\n".join(problems)


def test_the_check_names_what_is_missing() -> None:
    """The comparison fails, naming the metric, both ways and on labels (the test above relies on it)."""
    doc = documented("- `sidecar_a_total` (counter; x): a\n- `sidecar_b` (gauge): b\n")
    assert documented("- `sidecar_x_total` (counter; one, two): x")["sidecar_x_total"].labels == {"one", "two"}
    real = {"sidecar_a_total": Family("counter", frozenset({"y"})), "sidecar_c": Family("gauge", frozenset())}
    assert differences(doc, real) == [
        "sidecar_c is exported but not in docs/metrics.md",
        "sidecar_b is in docs/metrics.md but not exported",
        "sidecar_a_total has labels ['y'], docs/metrics.md says ['x']",
    ]
    with pytest.raises(ValueError, match="line 1"):
        documented("- `sidecar_bad` counter: no parentheses")


def test_created_series_are_folded_into_their_family() -> None:
    metrics = Metrics()
    text = metrics.exposition().decode()
    assert "sidecar_registry_relists_created" in text
    parsed = exported(text_string_to_metric_families(text))
    assert "sidecar_registry_relists_total" in parsed and not any(n.endswith("_created") for n in parsed)


def _parse(text: str) -> list[Metric]:
    return list(text_string_to_metric_families(text))


@pytest.mark.etcd
@pytest.mark.asyncio
async def test_metrics_page_of_a_running_sidecar_matches_the_doc(make_server) -> None:
    """A real sidecar with a local agent, DNS and proxy traffic: /metrics and the doc agree, labels included."""
    async with busy_sidecar(make_server) as server, aiohttp.ClientSession() as http:
        assert server.admin.address is not None
        admin = f"http://{server.admin.address[0]}:{server.admin.address[1]}"

        async def page() -> dict[str, Family]:
            async with http.get(admin + "/metrics") as response:
                assert response.status == 200
                return exported(_parse(await response.text()))

        async def dns_counted() -> bool:
            found = await page()
            return all(found[f"sidecar_dns_{name}_total"].labels is not None
                       for name in ("queries", "errors", "dropped", "forwarded", "upstream_errors"))

        await eventually(dns_counted, what="every labelled DNS family to have a sample")
        found = await page()
    problems = differences(documented(), found)
    # Families still without samples must be prometheus_client metrics, whose labels the unit test probes.
    probed = wrappers(Metrics())
    problems += [f"{name}: no sample, labels unchecked" for name, family in found.items()
                 if family.labels is None and name not in probed]
    assert not problems, "\n".join(problems)
