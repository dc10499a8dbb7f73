"""``sidecar webhook``: AdmissionReview -> JSONPatch, the same pods as ``inject``, and the real TLS server."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import yaml

from sidecar.kube.admission import BadReview, review
from sidecar.kube.inject import TEMPLATE_PATHS, InjectOptions
from sidecar.kube.webhook import Webhook

from ..etcd_process import free_port
from ..waiting import eventually
from .golden import CASES, DATA, case_args, case_options, check_golden, run_inject

OPTIONS = InjectOptions(upstream_dns=("10.96.0.10",))
REQUESTS = sorted(p.name.removesuffix(".request.json") for p in DATA.glob("*.request.json"))


# What the controllers put in the names and labels of the pods they make (fixed here, random in a cluster).
TEMPLATE_HASH = "7d9c4b9f6"     # a Deployment's ReplicaSet: <deployment>-<hash>, label pod-template-hash
REVISION_HASH = "5c8d7f9b4d"    # controller-revision-hash: <statefulset>-<hash>, or <hash> for a DaemonSet
CRON_RUN = "28473920"           # a CronJob's Job: <cronjob>-<scheduled time in minutes since the epoch>
OWNER_UID = "6f3c0d2e-1111-2222-3333-444455556666"
API_VERSIONS = {"ReplicaSet": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1", "Job": "batch/v1"}
# The DaemonSet controller pins each pod to its node and lets it ride out node conditions.
DAEMON_TOLERATIONS = [{"key": f"node.kubernetes.io/{taint}", "operator": "Exists", "effect": effect}
                      for taint, effect in (("not-ready", "NoExecute"), ("unreachable", "NoExecute"),
                                            ("disk-pressure", "NoSchedule"), ("memory-pressure", "NoSchedule"),
                                            ("pid-pressure", "NoSchedule"), ("unschedulable", "NoSchedule"))]


def pods_of(document: Any) -> list[tuple[str, dict]]:
    """(namespace, Pod) for every pod template in a document, made as its controller makes it and sent as the
    API server sends it on CREATE (kube-controller-manager's GetPodFromTemplate and each controller's additions).

    A Deployment's pod has no name yet, ``generateName: <deploy>-<hash>-``, the ``pod-template-hash`` label
    and its ReplicaSet ``<deploy>-<hash>`` as controller; a StatefulSet's is named ``<sts>-0`` with the
    pod-name and revision labels; a DaemonSet's has node affinity and tolerations; a Job's (a CronJob's run
    ``<cronjob>-<minutes>``) has the ``job-name`` labels and a finalizer. A Pod is sent as it is.
    """
    if not isinstance(document, dict):
        return []
    if document.get("kind") == "List":
        return [pod for item in document["items"] for pod in pods_of(item)]
    kind = document.get("kind", "")
    path = TEMPLATE_PATHS.get(kind)
    if path is None:
        return []
    template = document
    for key in path:
        template = template[key]
    meta = document.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    if not path:
        return [(namespace, {**document, "metadata": {**meta, "namespace": namespace}})]
    name = meta["name"]
    labels = dict((template.get("metadata") or {}).get("labels") or {})
    pod_meta: dict[str, Any] = {k: v for k, v in (template.get("metadata") or {}).items()
                                if k not in ("name", "namespace", "labels")}
    spec = json.loads(json.dumps(template["spec"]))
    owner_kind, owner = kind, name
    if kind == "Deployment":
        owner_kind, owner = "ReplicaSet", f"{name}-{TEMPLATE_HASH}"
        labels["pod-template-hash"] = TEMPLATE_HASH
    elif kind == "StatefulSet":
        pod_meta["name"] = f"{name}-0"
        labels.update({"controller-revision-hash": f"{name}-{REVISION_HASH}", "apps.kubernetes.io/pod-index": "0",
                       "statefulset.kubernetes.io/pod-name": f"{name}-0"})
    elif kind == "DaemonSet":
        labels.update({"controller-revision-hash": REVISION_HASH, "pod-template-generation": "1"})
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}]}}}
        spec["tolerations"] = [*spec.get("tolerations", []), *DAEMON_TOLERATIONS]
    elif kind in ("Job", "CronJob"):
        owner_kind, owner = "Job", (name if kind == "Job" else f"{name}-{CRON_RUN}")
        labels.update({"batch.kubernetes.io/controller-uid": OWNER_UID, "batch.kubernetes.io/job-name": owner,
                       "controller-uid": OWNER_UID, "job-name": owner})
        pod_meta["finalizers"] = ["batch.kubernetes.io/job-tracking"]
    pod_meta.update(generateName=f"{owner}-", namespace=namespace, labels=labels, ownerReferences=[
        {"apiVersion": API_VERSIONS[owner_kind], "kind": owner_kind, "name": owner, "uid": OWNER_UID,
         "controller": True, "blockOwnerDeletion": True}])
    return [(namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec})]


def admission_review(pod: dict, namespace: str, uid: str = "uid-1", **request: Any) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"}, "namespace": namespace,
                        "operation": "CREATE", "object": pod, **request}}


def patch_of(answer: dict) -> list[dict]:
    response = answer["response"]
    if "patch" not in response:
        return []
    assert response["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["patch"]))


@pytest.mark.parametrize("case", CASES)
def test_the_patched_pod_is_what_inject_makes(case: str) -> None:
    # For every workload: the webhook's patch on the pod its controller makes is that controller's pod of the
    # workload `sidecar inject` wrote (agent name included), and what `sidecar inject` makes of the pod itself.
    documents = list(yaml.safe_load_all((DATA / f"{case}.input.yaml").read_text()))
    pods = [p for d in documents for p in pods_of(d)]
    if not pods:
        pytest.skip("no pod template in this case")
    _, injected, _ = run_inject(case_args(case))
    expected = [pod for d in yaml.safe_load_all(injected) for _, pod in pods_of(d)]
    assert len(expected) == len(pods)
    for (namespace, pod), want in zip(pods, expected, strict=True):
        answer, _ = review(admission_review(pod, namespace), case_options(case))
        assert answer["response"]["allowed"] is True
        patched = jsonpatch.apply_patch(pod, patch_of(answer))
        assert patched == want
        code, out, _ = run_inject([*case_args(case)[:-1], "--namespace", namespace, "-"], stdin=yaml.safe_dump(pod))
        assert code == 0 and patched == yaml.safe_load(out)


@pytest.mark.parametrize("name", REQUESTS)
def test_golden_review(name: str) -> None:
    body = json.loads((DATA / f"{name}.request.json").read_text())
    answer, outcome = review(body, OPTIONS)
    assert answer["response"]["uid"] == body["request"]["uid"]
    shown = {"response": {k: v for k, v in answer["response"].items() if k != "patch"},
             "outcome": str(outcome), "patch": patch_of(answer)}
    check_golden(DATA / f"{name}.review.json", json.dumps(shown, indent=2) + "\n")


def test_keys_with_a_slash_or_a_tilde_are_escaped() -> None:
    body = json.loads((DATA / "webhook-pod.request.json").read_text())
    paths = [op["path"] for op in patch_of(review(body, OPTIONS)[0])]
    assert "/metadata/annotations/sidecar.agents.io~1status" in paths
    # A missing list is added whole before anything is appended under it; an existing one gets "/-".
    assert paths.index("/spec/initContainers") >= 0 and "/spec/containers/0/env/-" in paths


def test_a_dry_run_gets_the_same_answer() -> None:
    body = json.loads((DATA / "webhook-pod.request.json").read_text())
    wet = json.loads(json.dumps(body))
    wet["request"]["dryRun"] = False
    assert review(body, OPTIONS)[0] == review(wet, OPTIONS)[0]


@pytest.mark.parametrize("request_fields", [
    {"operation": "UPDATE"}, {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
    {"subResource": "ephemeralcontainers"},
])
def test_anything_but_a_pod_create_is_allowed_untouched(request_fields: dict) -> None:
    body = admission_review({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}}, "ns",
                            **request_fields)
    answer, outcome = review(body, OPTIONS)
    assert answer["response"] == {"uid": "uid-1", "allowed": True} and outcome.action == "passed"


V1 = "admission.k8s.io/v1"


@pytest.mark.parametrize(("body", "message"), [
    ({"kind": "Pod"}, "the body must be an AdmissionReview (kind: AdmissionReview)"),
    ([], "the body must be an AdmissionReview (kind: AdmissionReview)"),
    ({"apiVersion": V1, "kind": "AdmissionReviewList"}, "the body must be an AdmissionReview"),
    ({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "u"}},
     "apiVersion 'admission.k8s.io/v1beta1' is not served: this webhook answers admission.k8s.io/v1 only "
     "(admissionReviewVersions: [v1])"),
    ({"kind": "AdmissionReview", "request": {"uid": "u"}}, "apiVersion None is not served"),
    ({"apiVersion": V1, "kind": "AdmissionReview"}, "request is missing"),
    ({"apiVersion": V1, "kind": "AdmissionReview", "request": "x"}, "request is missing"),
    ({"apiVersion": V1, "kind": "AdmissionReview", "request": {"kind": {"kind": "Pod"}}}, "request.uid is missing"),
    ({"apiVersion": V1, "kind": "AdmissionReview", "request": {"uid": ""}}, "request.uid is missing"),
    ({"apiVersion": V1, "kind": "AdmissionReview",
      "request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "CREATE"}}, "request.object must be the Pod"),
])
def test_a_body_that_is_not_a_review_is_refused(body: dict, message: str) -> None:
    with pytest.raises(BadReview, match=re.escape(message)):
        review(body, OPTIONS)


# --- the TLS server ---------------------------------------------------------------------------------------


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    return make_cert(tmp_path, "webhook")


async def served_cert(port: int) -> bytes:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_unverified(), server_hostname="127.0.0.1")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return der


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.mark.asyncio
async def test_the_server_answers_reviews_over_tls(certs: tuple[Path, Path]) -> None:
    cert, key = certs
    webhook = Webhook(OPTIONS, "127.0.0.1:0", str(cert), str(key))
    await webhook.start()
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        body = json.loads((DATA / "webhook-pod.request.json").read_text())
        async with aiohttp.ClientSession(base_url=f"https://127.0.0.1:{webhook.port}") as client:
            async with client.post("/mutate", json=body, ssl=trust) as response:
                assert response.status == 200
                answer = await response.json()
            async with client.post("/mutate", data=b"{not json", ssl=trust) as response:
                assert response.status == 400 and "error" in await response.json()
            old = {**body, "apiVersion": "admission.k8s.io/v1beta1"}
            async with client.post("/mutate", json=old, ssl=trust) as response:
                assert response.status == 400
                assert "admission.k8s.io/v1beta1" in (await response.json())["error"]
            async with client.post("/mutate", json={"apiVersion": V1, "kind": "AdmissionReview"},
                                   ssl=trust) as response:
                assert response.status == 400 and (await response.json())["error"] == "request is missing"
            async with client.get("/healthz", ssl=trust) as response:
                assert response.status == 200
        assert answer == review(body, OPTIONS)[0]
        assert answer["response"]["uid"] == body["request"]["uid"] and patch_of(answer)
    finally:
        await webhook.stop()


@pytest.mark.asyncio
async def test_a_rotated_certificate_is_served_without_a_restart(certs: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = certs
    webhook = Webhook(OPTIONS, "127.0.0.1:0", str(cert), str(key))
    await webhook.start()
    try:
        first = await served_cert(webhook.port)
        assert webhook.reload_if_changed() is False
        new_cert, new_key = make_cert(tmp_path, "rotated")
        shutil.copyfile(new_key, key)
        shutil.copyfile(new_cert, cert)
        assert webhook.reload_if_changed() is True
        second = await served_cert(webhook.port)
        assert second != first and second == ssl.PEM_cert_to_DER_cert(new_cert.read_text())
    finally:
        await webhook.stop()


@pytest.mark.asyncio
async def test_sidecar_webhook_command_serves_until_sigterm(certs: tuple[Path, Path]) -> None:
    cert, key = certs
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "webhook", "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert),
        "--tls-key", str(key), "--upstream-dns", "10.96.0.10", stderr=asyncio.subprocess.PIPE)
    trust = ssl.create_default_context(cafile=str(cert))
    body = json.loads((DATA / "webhook-pod.request.json").read_text())
    try:
        async def answers() -> dict | None:
            try:
                async with aiohttp.ClientSession() as client, \
                        client.post(f"https://127.0.0.1:{port}/mutate", json=body, ssl=trust) as response:
                    return await response.json()
            except aiohttp.ClientConnectionError:
                return None

        await eventually(answers, what="the webhook to listen")
        assert await answers() == review(body, OPTIONS)[0]
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    assert "pod/chat-7d9c4b9f6-: injected (dry run)" in stderr.decode()


def test_a_missing_certificate_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "sidecar", "webhook", "--tls-cert", str(tmp_path / "none.crt"),
                           "--tls-key", str(tmp_path / "none.key"), "--upstream-dns", "10.96.0.10"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("sidecar: invalid configuration: --tls-cert/--tls-key: cannot load")
