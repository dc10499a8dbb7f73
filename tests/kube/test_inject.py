"""``sidecar inject``: golden files per case, idempotence, and clear errors on bad input."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from sidecar.cli import parser
from sidecar.errors import ConfigError
from sidecar.kube.command import options_from
from sidecar.kube.inject import (
    STATUS,
    InjectError,
    InjectOptions,
    inject_object,
    inject_pod,
    pod_workload,
    upstream,
    workload_name,
)

from .golden import CASES, DATA, case_args, check_golden, run_inject

OPTIONS = InjectOptions(upstream_dns=("10.96.0.10",))


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    code, out, err = run_inject(case_args(case))
    assert code == 0
    check_golden(DATA / f"{case}.golden.yaml", out)
    check_golden(DATA / f"{case}.report.txt", err.replace(str(DATA) + "/", ""))


@pytest.mark.parametrize("case", CASES)
def test_injecting_twice_changes_nothing(case: str) -> None:
    _, once, _ = run_inject(case_args(case))
    argv = case_args(case)[:-1]
    code, twice, report = run_inject([*argv, "-"], stdin=once)
    assert code == 0 and twice == once
    assert "injected\n" not in report.replace("already injected", "")


def test_every_workload_kind_and_the_skips_are_covered() -> None:
    reports = "".join((DATA / f"{case}.report.txt").read_text() for case in CASES)
    for kind in ("pod", "deployment", "statefulset", "daemonset", "replicaset", "job", "cronjob"):
        assert re.search(f"^{kind}/[^:]+: injected$", reports, re.MULTILINE), kind
    for fragment in ("already injected, unchanged", "skipped (sidecar.agents.io/inject: disabled)",
                     "skipped (label sidecar.agents.io/inject: disabled)",
                     "skipped (hostNetwork pod", "configmap/search-settings: passed through (not a workload)"):
        assert fragment in reports, fragment


def test_already_injected_input_is_the_pod_golden() -> None:
    # The "already" case must stay a real injection output, or it tests nothing.
    already = yaml.safe_load((DATA / "already-injected.input.yaml").read_text())
    assert already == yaml.safe_load((DATA / "pod.golden.yaml").read_text())
    assert STATUS in already["metadata"]["annotations"]


def test_the_input_is_never_modified() -> None:
    pod = yaml.safe_load((DATA / "existing.input.yaml").read_text())
    before = yaml.safe_dump(pod)
    injected, outcome = inject_pod(pod, OPTIONS)
    assert outcome.action == "injected" and yaml.safe_dump(pod) == before and injected != pod


def test_user_nameservers_become_the_sidecar_upstreams() -> None:
    pod = yaml.safe_load((DATA / "existing.input.yaml").read_text())
    injected, _ = inject_pod(pod, OPTIONS)
    args = injected["spec"]["initContainers"][0]["args"]
    assert args[args.index("--upstream-dns") + 1] == "10.0.0.53:53,[fd00::53]:53"
    assert injected["spec"]["dnsConfig"]["nameservers"] == ["127.0.0.1"]


def _owner(kind: str, name: str, controller: bool = True) -> dict:
    return {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": controller}


@pytest.mark.parametrize(("metadata", "expected"), [
    # What the API server sends the webhook: no name yet, generateName, the controller's labels and reference.
    ({"generateName": "chat-7d9c4b9f6-", "labels": {"pod-template-hash": "7d9c4b9f6"},
      "ownerReferences": [_owner("ReplicaSet", "chat-7d9c4b9f6")]}, ("ReplicaSet", "chat-7d9c4b9f6", "chat")),
    ({"generateName": "chat-7d9c4b9f6-", "labels": {"pod-template-hash": "7d9c4b9f6"}},
     ("Pod", "chat-7d9c4b9f6", "chat")),
    ({"name": "chat-7d9c4b9f6-x2x9z", "generateName": "chat-7d9c4b9f6-", "labels": {"pod-template-hash": "7d9c4b9f6"},
      "ownerReferences": [_owner("ReplicaSet", "chat-7d9c4b9f6")]}, ("ReplicaSet", "chat-7d9c4b9f6", "chat")),
    ({"generateName": "planner-", "ownerReferences": [_owner("ReplicaSet", "planner")]},
     ("ReplicaSet", "planner", "planner")),
    ({"name": "memory-2", "generateName": "memory-", "ownerReferences": [_owner("StatefulSet", "memory")],
      "labels": {"statefulset.kubernetes.io/pod-name": "memory-2", "controller-revision-hash": "memory-5c8d7f9b4d"}},
     ("StatefulSet", "memory", "memory")),
    ({"name": "memory-12", "labels": {"statefulset.kubernetes.io/pod-name": "memory-12"}},
     ("StatefulSet", "memory", "memory")),
    ({"generateName": "node-agent-", "labels": {"controller-revision-hash": "5c8d7f9b4d"},
      "ownerReferences": [_owner("DaemonSet", "node-agent")]}, ("DaemonSet", "node-agent", "node-agent")),
    ({"generateName": "node-agent-", "labels": {"controller-revision-hash": "5c8d7f9b4d"}},
     ("Pod", "node-agent", "node-agent")),
    # An Indexed Job's pods are generated as <job>-<index>-: the job-name label names the Job.
    ({"generateName": "eval-3-", "labels": {"job-name": "eval", "batch.kubernetes.io/job-name": "eval"}},
     ("Job", "eval", "eval")),
    ({"generateName": "digest-28473920-", "ownerReferences": [_owner("Job", "digest-28473920")]},
     ("Job", "digest-28473920", "digest")),
    ({"generateName": "digest-28473920-", "labels": {"job-name": "digest-28473920"}},
     ("Job", "digest-28473920", "digest")),
    # A reference that is not the controller's does not name the workload.
    ({"name": "solo", "ownerReferences": [_owner("ConfigMap", "settings", controller=False)]}, ("Pod", "solo", "solo")),
    ({"name": "chat-0"}, ("Pod", "chat-0", "chat-0")),
    ({}, ("Pod", "", "")),
])
def test_the_workload_of_a_pod(metadata: dict, expected: tuple[str, str, str]) -> None:
    kind, name = pod_workload(metadata)
    assert (kind, name, workload_name(kind, name, metadata.get("labels") or {})) == expected


@pytest.mark.parametrize(("kind", "name", "labels", "expected"), [
    ("Deployment", "chat", {}, "chat"),
    ("ReplicaSet", "chat-7d9c4b9f6", {"pod-template-hash": "7d9c4b9f6"}, "chat"),
    ("ReplicaSet", "chat-7d9c4b9f6", {}, "chat-7d9c4b9f6"),
    ("StatefulSet", "memory", {}, "memory"),
    ("Job", "eval", {}, "eval"),
    # A hand-named Job ending in 8 to 10 digits is taken for a CronJob's run, as the webhook must take it.
    ("Job", "backup-20240101", {}, "backup"),
    ("Job", "backup-2024", {}, "backup-2024"),
    ("Pod", "backup-20240101", {}, "backup-20240101"),
    ("CronJob", "digest", {}, "digest"),
])
def test_the_name_of_a_workload(kind: str, name: str, labels: dict, expected: str) -> None:
    assert workload_name(kind, name, labels) == expected


@pytest.mark.parametrize(("given", "expected"), [
    ("10.96.0.10", "10.96.0.10:53"), ("10.96.0.10:5353", "10.96.0.10:5353"), ("fd00::a", "[fd00::a]:53"),
    ("[fd00::a]:53", "[fd00::a]:53"),
])
def test_upstream_address(given: str, expected: str) -> None:
    assert upstream(given) == expected


@pytest.mark.parametrize(("document", "message"), [
    ({"kind": "Pod", "metadata": {"name": "p", "annotations": {"sidecar.agents.io/agent-port": "web"}},
      "spec": {"containers": [{"name": "a", "ports": [{"name": "http", "containerPort": 80}]}]}},
     "pod/p: sidecar.agents.io/agent-port: 'web' is neither a port number nor a named container port (named: http)"),
    ({"kind": "Deployment", "metadata": {"name": "d"}, "spec": {}}, "deployment/d: no pod template at .spec.template"),
    ({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}, "pod/p: spec.containers is empty"),
    ({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"dnsPolicy": "clusterfirst", "containers": [{"name": "a"}]}},
     "pod/p: dnsPolicy 'clusterfirst' is not one of ClusterFirst, ClusterFirstWithHostNet, Default, None"),
    ({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": {"name": "a"}}},
     "pod/p: containers must be a list (got dict)"),
])
def test_nonsense_objects_are_refused_by_name(document: dict, message: str) -> None:
    with pytest.raises(InjectError) as caught:
        inject_object(document, OPTIONS)
    assert str(caught.value) == message


def test_invalid_yaml_is_a_clear_error_and_a_non_zero_exit(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: [\n")
    done = subprocess.run([sys.executable, "-m", "sidecar", "inject", "--upstream-dns", "10.96.0.10", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"sidecar: {bad}: not valid YAML at line 4, column 1")


def test_stdin_and_a_directory(tmp_path) -> None:
    for case in ("pod", "job"):
        (tmp_path / f"{case}.yaml").write_text((DATA / f"{case}.input.yaml").read_text())
    (tmp_path / "notes.txt").write_text("not yaml: [")
    code, out, err = run_inject(["inject", "--upstream-dns", "10.96.0.10", str(tmp_path)])
    assert code == 0 and err.splitlines() == ["job/eval: injected", "pod/chat-0: injected"]
    _, pod_out, _ = run_inject(["inject", "--upstream-dns", "10.96.0.10", "-"],
                               stdin=(DATA / "pod.input.yaml").read_text())
    assert yaml.safe_load_all(out) and pod_out == (DATA / "pod.golden.yaml").read_text()
    kinds = [d["kind"] for d in yaml.safe_load_all(out)]
    assert kinds == ["Job", "Pod"]


@pytest.mark.parametrize(("value", "message"), [
    ("kube-dns.kube-system", "--upstream-dns: must be IP or IP:PORT (a pod's resolver takes addresses) "
                             "(got 'kube-dns.kube-system')"),
    ("10.96.0.10:0", "--upstream-dns: the port must be 1 to 65535 (got '10.96.0.10:0')"),
    (",", "--upstream-dns: must name the cluster DNS service IP (got ',')"),
])
def test_a_bad_upstream_dns_is_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        options_from(parser().parse_args(["inject", "--upstream-dns", value]))
    assert str(caught.value) == message
