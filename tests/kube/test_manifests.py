"""deploy/kubernetes: every manifest validates (kubernetes-validate, offline schemas, strict), the pieces
refer to each other correctly, and every sidecar command line is one the real parser accepts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sidecar.cli import parser
from sidecar.kube.inject import ADMIN_PORT, CONFIG_DIR, INJECT, InjectOptions, default_etcd_endpoints, inject_pod
from sidecar.kube.webhook import MUTATE_PATH

from .commands import parse, run_settings
from .golden import CASES, DATA, case_args, run_inject

KUBE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# Native sidecars (initContainers with restartPolicy: Always) are on by default from 1.29.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CERT_MANAGER_KINDS = {"Issuer", "Certificate"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


MANIFESTS = {str(p.relative_to(KUBE)): documents(p) for p in sorted(KUBE.rglob("*.yaml"))}
EVERYTHING = [d for docs in MANIFESTS.values() for d in docs]


def find(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in EVERYTHING if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def validate(document: dict[str, Any], version: str, where: str) -> None:
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {document['kind']}/{document['metadata'].get('name')} against {version}: "
                    f"{path}: {exc.message}")


def pod_specs(document: dict[str, Any]) -> list[dict[str, Any]]:
    spec = document.get("spec") or {}
    if document["kind"] == "Pod":
        return [spec]
    if document["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    return [spec["template"]["spec"]] if "template" in spec else []


def sidecar_containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for spec in pod_specs(document) for c in (*spec.get("initContainers", []), *spec["containers"])
            if c["image"].startswith("sidecar:")]


def argv(container: dict[str, Any]) -> list[str]:
    """The sidecar's argv: the image's ENTRYPOINT is `sidecar`, so args alone, or command without it."""
    command = container.get("command", [])
    assert command in ([], ["sidecar"]), container["name"]
    return list(container.get("args", []))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifests_validate(name: str, version: str) -> None:
    for document in MANIFESTS[name]:
        if document["apiVersion"].startswith("cert-manager.io/"):
            assert document["kind"] in CERT_MANAGER_KINDS  # a CRD: no schema ships for it
            continue
        validate(document, version, name)


def test_strict_validation_does_catch_mistakes() -> None:
    # The check above would be worthless if unknown fields passed.
    deployment = yaml.safe_load(yaml.safe_dump(find("Deployment", "sidecar-webhook")))
    deployment["spec"]["template"]["spec"]["containers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


@pytest.fixture(scope="module")
def config_files(tmp_path_factory) -> dict[str, str]:
    """The injected --config path, mapped to a copy of deploy/kubernetes/sidecar-config.yaml's file."""
    path = tmp_path_factory.mktemp("config") / "sidecar.yaml"
    path.write_text(find("ConfigMap", "sidecar-config")["data"]["sidecar.yaml"])
    return {f"{CONFIG_DIR}/sidecar.yaml": str(path)}


@pytest.mark.parametrize("case", CASES)
def test_injected_output_validates_and_its_sidecar_command_parses(case: str, config_files) -> None:
    _, out, _ = run_inject(case_args(case))
    native = "--no-native" not in case_args(case)
    for document in (d for d in yaml.safe_load_all(out) if d):
        items = document["items"] if document["kind"] == "List" else [document]
        for item in items:
            for version in VERSIONS if native else ("1.27.0", *VERSIONS):
                validate(item, version, f"{case}.golden.yaml")
            for container in sidecar_containers(item):
                settings = run_settings(argv(container), {}, config_files, f"{case}: injected sidecar")
                assert settings.dns.listen == "127.0.0.1:53"
                assert settings.admin.listen.endswith(f":{ADMIN_PORT}")


def test_every_sidecar_command_in_deploy_parses() -> None:
    seen = {}
    for name, docs in MANIFESTS.items():
        for document in docs:
            for container in sidecar_containers(document):
                args = parse(argv(container), f"{name}: {container['name']}")
                env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
                if args.command == "run":
                    run_settings(argv(container), env, {}, f"{name}: {container['name']}")
                seen[document["metadata"]["name"]] = args.command
    assert seen == {"sidecar-webhook": "webhook", "sidecar-dns": "run"}


def test_probes_hit_the_admin_api_of_the_node_dns_sidecar() -> None:
    (container,) = sidecar_containers(find("DaemonSet", "sidecar-dns"))
    settings = run_settings(argv(container), {}, {}, "daemonset-dns.yaml")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["admin"] == int(settings.admin.listen.rsplit(":", 1)[1])
    assert ports["dns"] == int(settings.dns.listen.rsplit(":", 1)[1])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert settings.etcd.endpoints == default_etcd_endpoints()


def test_the_default_etcd_endpoint_is_the_statefulsets_headless_service() -> None:
    etcd = find("StatefulSet", "etcd")
    service = find("Service", etcd["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    namespace = etcd["metadata"]["namespace"]
    # One name whose A records are every member: the sidecar's channel balances over them all.
    assert default_etcd_endpoints() == (f"http://{service['metadata']['name']}.{namespace}.svc.cluster.local:2379",)
    members = [f"http://etcd-{i}.{service['metadata']['name']}.{namespace}.svc.cluster.local:2379"
               for i in range(etcd["spec"]["replicas"])]
    args = etcd["spec"]["template"]["spec"]["containers"][0]["args"]
    initial = next(a for a in args if a.startswith("--initial-cluster=")).split("=", 1)[1]
    assert initial.replace(":2380", ":2379").replace("etcd-0=", "").replace("etcd-1=", "") \
        .replace("etcd-2=", "").split(",") == members


def test_the_words_about_the_default_etcd_endpoint_name_the_service() -> None:
    (inject,) = [a.choices["inject"] for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (option,) = [a for a in inject._actions if a.dest == "etcd_endpoints"]
    assert default_etcd_endpoints("<cluster-domain>")[0] in str(option.help) and "member" in str(option.help)
    header = (KUBE / "etcd.yaml").read_text().split("\napiVersion:", 1)[0]
    assert default_etcd_endpoints()[0] in header


def test_the_webhook_configuration_matches_the_service_and_the_server() -> None:
    config = find("MutatingWebhookConfiguration", "sidecar-injector")
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] == 5
    assert hook["reinvocationPolicy"] == "IfNeeded" and hook["sideEffects"] == "None"
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    excluded = next(e for e in hook["namespaceSelector"]["matchExpressions"]
                    if e["key"] == "kubernetes.io/metadata.name")
    assert excluded["operator"] == "NotIn" and set(excluded["values"]) == {"sidecar-system", "kube-system"}
    # The pods objectSelector keeps from the webhook are the ones inject skips too.
    (skip,) = hook["objectSelector"]["matchExpressions"]
    assert skip["key"] == INJECT and skip["operator"] == "NotIn"
    for value in skip["values"]:
        pod = {"metadata": {"labels": {skip["key"]: value}}, "spec": {"containers": [{"name": "a"}]}}
        assert inject_pod(pod, InjectOptions(upstream_dns=("10.96.0.10",)))[1].action == "skipped"
    ref = hook["clientConfig"]["service"]
    assert ref["path"] == MUTATE_PATH
    service = find("Service", ref["name"])
    assert service["metadata"]["namespace"] == ref["namespace"]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]]
    deployment = find("Deployment", "sidecar-webhook")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = parse(argv(container), "webhook.yaml")
    assert int(args.listen.rsplit(":", 1)[1]) == named[port["targetPort"]]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert args.tls_cert == f"{mounts[volume['name']]}/tls.crt" and args.tls_key == f"{mounts[volume['name']]}/tls.key"
    # cert-manager issues the Secret the Deployment mounts, for the name the API server calls.
    certificate = find("Certificate", "sidecar-webhook")
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        f"{certificate['metadata']['namespace']}/{certificate['metadata']['name']}"
    assert certificate["spec"]["secretName"] == volume["secret"]["secretName"]
    assert f"{ref['name']}.{ref['namespace']}.svc" in certificate["spec"]["dnsNames"]


def test_the_example_agent_is_injected_with_its_annotations() -> None:
    code, out, err = run_inject(["inject", "--upstream-dns", "10.96.0.10", str(KUBE / "example-agent.yaml")])
    assert code == 0 and "deployment/summarize: injected" in err
    namespace = find("Namespace", "agents")
    assert namespace["metadata"]["labels"]["sidecar.agents.io/inject"] == "enabled"
    deployment = next(d for d in yaml.safe_load_all(out) if d["kind"] == "Deployment")
    (container,) = sidecar_containers(deployment)
    settings = run_settings(argv(container), {}, {}, "example-agent.yaml injected")
    assert settings.agent.capabilities == ("summarize", "chat") and settings.agent.tags == ("gpu",)
    assert settings.agent.port == 8080 and settings.agent.name == "summarize"


def test_the_docs_show_the_injected_example_as_inject_makes_it() -> None:
    doc = (KUBE.parents[1] / "docs" / "kubernetes.md").read_text()
    _, out, _ = run_inject(["inject", "--upstream-dns", "10.96.0.10", str(KUBE / "example-agent.yaml")])
    deployment = next(d for d in yaml.safe_load_all(out) if d["kind"] == "Deployment")
    block = doc.split("<!-- injected example-agent.yaml -->", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == deployment, "docs/kubernetes.md: regenerate the injected example"


def test_golden_files_exist_for_every_case() -> None:
    assert all((DATA / f"{case}.golden.yaml").exists() for case in CASES)
