"""admission.k8s.io/v1 AdmissionReview -> AdmissionReview response: pure, the webhook's core."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from .inject import InjectError, InjectOptions, Outcome, inject_pod
from .patch import diff

API_VERSION = "admission.k8s.io/v1"


class BadReview(ValueError):
    """A request body that is not an AdmissionReview the webhook can answer (HTTP 400)."""


def review(body: Any, options: InjectOptions) -> tuple[dict[str, Any], Outcome]:
    """The AdmissionReview answering ``body``, and what was done to the pod.

    Pods on CREATE get the injection as a base64 JSONPatch; anything else, and skipped or already
    injected pods, are allowed with no patch. A dry run gets the same answer (the webhook has no side
    effects to hold back, and ``kubectl apply --dry-run=server`` then shows the injected pod). A pod
    whose annotations make no sense is denied with the reason. A body that is not an
    ``admission.k8s.io/v1`` AdmissionReview with a ``request.uid`` raises BadReview (HTTP 400).
    """
    if not isinstance(body, Mapping) or body.get("kind") != "AdmissionReview":
        raise BadReview("the body must be an AdmissionReview (kind: AdmissionReview)")
    if body.get("apiVersion") != API_VERSION:
        # An answer in another version than the request's is rejected by the API server; say why instead.
        raise BadReview(f"apiVersion {body.get('apiVersion')!r} is not served: this webhook answers {API_VERSION} "
                        "only (admissionReviewVersions: [v1])")
    request = body.get("request")
    if not isinstance(request, Mapping):
        raise BadReview("request is missing")
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReview("request.uid is missing")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    answer = {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
    kind = (request.get("kind") or {}).get("kind") if isinstance(request.get("kind"), Mapping) else None
    pod = request.get("object")
    name = str(request.get("name") or "")
    if kind != "Pod" or request.get("operation") != "CREATE" or request.get("subResource"):
        return answer, Outcome(str(kind or ""), name, "passed", "not a Pod CREATE")
    if not isinstance(pod, Mapping):
        raise BadReview("request.object must be the Pod")
    try:
        new, outcome = inject_pod(pod, options, namespace=request.get("namespace") or None)
    except InjectError as exc:
        response.update(allowed=False, status={"code": 400, "reason": "BadRequest",
                                               "message": f"sidecar injection: {exc}"})
        return answer, Outcome("Pod", name or _pod_name(pod), "refused", str(exc))
    if outcome.action == "injected":
        patch = json.dumps(diff(pod, new), separators=(",", ":")).encode()
        response.update(patchType="JSONPatch", patch=base64.b64encode(patch).decode("ascii"))
    return answer, outcome


def _pod_name(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata")
    return str(meta.get("name") or meta.get("generateName") or "") if isinstance(meta, Mapping) else ""
