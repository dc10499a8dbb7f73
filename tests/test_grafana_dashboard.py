"""deploy/grafana/sidecar.json: every PromQL expression names metrics docs/metrics.md lists (and so /metrics).

tests/test_metrics_doc.py ties docs/metrics.md to what a sidecar exports; this ties the
dashboard to docs/metrics.md. With promtool installed the expressions are also parsed.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .etcd_process import free_port
from .metrics_doc import HISTOGRAM_SERIES, busy_sidecar, documented, series
from .waiting import eventually

GRAFANA = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "sidecar.json"

# Metrics the dashboard shows before they exist: the dynamic-config metrics (issue 8) land
# with the config watch. When docs/metrics.md lists one, test_pending_metrics_are_not_yet_documented
# fails so that its entry here is removed.
PENDING: dict[str, str] = {}

_NAME_MATCHER = re.compile(r"""__name__\s*=\s*["']([A-Za-z_:][\w:]*)["']""")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_GROUPING_LABELS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
# Labels every scraped series has (target labels) or that PromQL adds.
TARGET_LABELS = {"instance", "job", "le", "__name__"}
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*?)(?:,\s*\w+)?\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<selector>.*)\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and durations aside)."""
    names = set(_NAME_MATCHER.findall(expr))
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    for name, call in _IDENTIFIER.findall(text):
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def label_names(expr: str) -> set[str]:
    """The label names an expression matches on or groups by."""
    text = _STRING.sub('""', expr)
    names = {n.strip() for group in _GROUPING_LABELS.findall(text) for n in group.split(",") if n.strip()}
    for matchers in re.findall(r"\{([^{}]*)\}", text):
        names |= set(_MATCHER_LABEL.findall(matchers))
    return names


def template_expr(query: str) -> str:
    """The PromQL inside a Grafana variable query (``label_values(selector, label)``, ``query_result(expr)``)."""
    for form in (_LABEL_VALUES, _QUERY_RESULT):
        match = form.match(query)
        if match:
            return match["selector"]
    raise ValueError(f"a templating query this test does not know: {query!r}")


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target, nested rows included, and of every query variable."""
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield f"variable {variable['name']}", template_expr(query["query"] if isinstance(query, dict) else query)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.mark.parametrize(("expr", "names"), [
    ("sidecar_registry_etcd_up == 0", {"sidecar_registry_etcd_up"}),
    ('histogram_quantile(0.99, sum by (le, instance) (rate(sidecar_x_seconds_bucket{outcome=~"a|b",'
     'instance=~"$instance"}[$__rate_interval])))', {"sidecar_x_seconds_bucket"}),
    ("sum(rate(a_total[5m])) by (kind) / ignoring(kind) group_left sum without (agent) (b) offset 1h",
     {"a_total", "b"}),
    ('count(count_values("version", sidecar_config_version)) or vector(0)', {"sidecar_config_version"}),
    ('{__name__="sidecar_dns_queries_total", rcode!="NOERROR"} > bool 1e3', {"sidecar_dns_queries_total"}),
    ('label_replace(up{job="x"}, "dst", "$1", "src", "(.*)") and on(instance) c:recorded:rate5m',
     {"up", "c:recorded:rate5m"}),
    ("max_over_time(sidecar_y[1h:5m]) unless sidecar_z @ start()", {"sidecar_y", "sidecar_z"}),
])
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_label_names_of_an_expression() -> None:
    assert label_names('sum by (kind, outcome) (rate(x{instance=~"$instance",outcome!="ok"}[5m])) '
                       '/ ignoring(kind) y{a="{b=c}"}') == {"kind", "outcome", "instance", "a"}


def test_template_queries() -> None:
    assert template_expr("label_values(sidecar_registry_etcd_up, instance)") == "sidecar_registry_etcd_up"
    assert template_expr('query_result(topk(5, sum by (kind) (x{a="b"})))') == 'topk(5, sum by (kind) (x{a="b"}))'
    with pytest.raises(ValueError, match="metrics"):
        template_expr("metrics(sidecar_.*)")


def test_every_expression_names_a_documented_metric(dashboard: dict[str, Any]) -> None:
    known = series(documented()) | PENDING.keys()
    problems = []
    for where, expr in expressions(dashboard):
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: names no metric: {expr}")
        problems += [f"{where}: {name} is not in docs/metrics.md" for name in sorted(names - known)]
    assert not problems, "\n".join(problems)


def test_every_label_is_one_its_metrics_have(dashboard: dict[str, Any]) -> None:
    """A ``by (capability)`` on a metric without that label draws one empty line; this catches it."""
    doc = documented()
    labels_of = {name: family.labels or frozenset() for name, family in doc.items()}
    labels_of |= {name + suffix: labels for name, labels in list(labels_of.items()) for suffix in HISTOGRAM_SERIES}
    problems = []
    for where, expr in expressions(dashboard):
        allowed = TARGET_LABELS.union(*(labels_of.get(name, frozenset()) for name in metric_names(expr)))
        problems += [f"{where}: no metric of {expr} has the label {label}"
                     for label in sorted(label_names(expr) - allowed)]
    assert not problems, "\n".join(problems)


def test_pending_metrics_are_not_yet_documented() -> None:
    documented_now = sorted(series(documented()) & PENDING.keys())
    assert not documented_now, f"docs/metrics.md now lists {documented_now}: remove them from PENDING in {__file__}"


def test_the_dashboard_shows_what_the_issue_asks(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(expr) for _, expr in expressions(dashboard)))
    assert {
        "sidecar_dns_queries_total", "sidecar_dns_query_duration_seconds_bucket",  # DNS qps and latency
        "sidecar_proxy_requests_total", "sidecar_proxy_request_duration_seconds_bucket",  # proxy rps, errors, latency
        "sidecar_proxy_breakers", "sidecar_proxy_breaker_state", "sidecar_proxy_breaker_transitions_total",
        "sidecar_registry_snapshot_stale_seconds", "sidecar_registry_etcd_up",  # snapshot age, etcd
        "sidecar_config_version",
    } <= used
    # Proxy rps, errors and latency per capability: every expression over them groups by capability.
    per_request = {"sidecar_proxy_requests_total", "sidecar_proxy_request_duration_seconds_bucket"}
    ungrouped = [where for where, expr in expressions(dashboard)
                 if metric_names(expr) & per_request and not where.startswith("variable")
                 and "capability" not in {n.strip() for g in _GROUPING_LABELS.findall(expr) for n in g.split(",")}]
    assert not ungrouped, f"not by (capability): {ungrouped}"


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            refs = [target["refId"] for target in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), panel["title"]
    # The datasource variable's default is the provisioned datasource.
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = provisioned["datasources"]
    assert source["type"] == "prometheus" and variables["datasource"]["current"]["value"] == source["uid"]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "sidecar.yml").read_text())["providers"]
    assert providers and all(p["type"] == "file" and p["options"]["path"] for p in providers)


def filled(expr: str, interval: str = "5m") -> str:
    """An expression with Grafana's variables replaced: intervals by ``interval``, the rest by ``.*``."""
    expr = re.sub(r"\$__(?:rate_interval|interval|range)\b", interval, expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


promtool = shutil.which("promtool")
prometheus = shutil.which("prometheus")


@pytest.mark.skipif(promtool is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_parses_every_expression(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each expression, with Grafana's variables filled in, as a recording rule that promtool checks."""
    rules = [{"record": f"dashboard:expr{i}", "expr": filled(expr)}
             for i, (_, expr) in enumerate(expressions(dashboard))]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, target: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A Prometheus scraping ``target`` every second; (its process, its web port). Stopped on exit."""
    assert prometheus is not None
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "sidecar", "static_configs": [{"targets": [target]}]}]}))
    with (tmp_path / "prometheus.log").open("w") as log, subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT) as process:
        try:
            yield process, port
        finally:
            process.terminate()
            process.wait(30)


@pytest.mark.etcd
@pytest.mark.asyncio
@pytest.mark.skipif(prometheus is None, reason="prometheus not installed (Debian package prometheus)")
async def test_prometheus_answers_every_panel_of_a_real_sidecar(make_server, dashboard: dict[str, Any],
                                                                tmp_path: Path) -> None:
    """A real Prometheus scrapes a sidecar that served traffic; every expression evaluates without error,
    and the panels the issue asks for (DNS, proxy, snapshot age, etcd) return series."""
    async with busy_sidecar(make_server) as server:
        assert server.admin.address is not None
        with running_prometheus(tmp_path, "{}:{}".format(*server.admin.address[:2])) as (process, web_port):
            async with aiohttp.ClientSession() as http:
                async def query(expr: str) -> dict[str, Any]:
                    async with http.get(f"http://127.0.0.1:{web_port}/api/v1/query",
                                        params={"query": expr}) as response:
                        return dict(await response.json())

                async def scraped() -> bool:
                    if process.poll() is not None:
                        raise AssertionError("prometheus exited:\n" + (tmp_path / "prometheus.log").read_text())
                    try:
                        answer = await query("count_over_time(sidecar_registry_etcd_up[1m]) >= 2")
                    except aiohttp.ClientError:
                        return False
                    return bool(answer.get("data", {}).get("result"))

                await eventually(scraped, timeout=60, what="two scrapes of the sidecar", step=0.2)
                answered, problems = set(), []
                for where, expr in expressions(dashboard):
                    answer = await query(filled(expr, "1m"))
                    if answer["status"] != "success":
                        problems.append(f"{where}: {answer.get('error')}: {expr}")
                    elif answer["data"]["result"]:
                        answered |= metric_names(expr)
    assert not problems, "\n".join(problems)
    asked = {"sidecar_dns_queries_total", "sidecar_dns_query_duration_seconds_bucket", "sidecar_proxy_requests_total",
             "sidecar_proxy_request_duration_seconds_bucket", "sidecar_registry_snapshot_stale_seconds",
             "sidecar_registry_etcd_up", "sidecar_registry_snapshot_agents"}
    assert asked <= answered, f"no panel over {sorted(asked - answered)} returned a series"
