"""deploy/prometheus/alerts.yml: promtool accepts it, its unit tests pass, it names only exported metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sidecar.metrics import Metrics

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed (Debian package prometheus)")


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([str(promtool), "check", "rules", "alerts.yml"], cwd=RULES, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_rules() -> None:
    result = subprocess.run([str(promtool), "test", "rules", "alerts_test.yml"], cwd=RULES, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_use_the_sidecars_metric_names() -> None:
    exported = set()
    for line in Metrics().exposition().decode().splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            exported |= {name} | ({f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else set())
            if kind == "counter":
                exported |= {name if name.endswith("_total") else f"{name}_total"}
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"][0]["rules"]
    used = {m for rule in rules for m in re.findall(r"\b(sidecar_[a-z0-9_]+)", rule["expr"])}
    assert used and used <= exported, used - exported
    names = {rule["alert"] for rule in rules}
    assert {"SidecarRegistrationFailureRateHigh", "SidecarDiscoveryLatencyHigh", "EtcdMemberDown",
            "SidecarHealthCheckFailureRateHigh", "SidecarAvailabilityLow"} <= names
