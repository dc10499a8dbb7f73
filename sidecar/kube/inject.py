"""Add the sidecar to Kubernetes objects: a pure function of (object, options), no I/O.

``sidecar inject`` (YAML text in, YAML text out) and ``sidecar webhook`` (one Pod per
AdmissionReview) both call :func:`inject_pod`, so the two paths cannot drift. What it
changes follows Istio's and Linkerd's injectors: a native sidecar (``initContainers[0]``
with ``restartPolicy: Always``), the pod's DNS pointed at the sidecar, the proxy
environment in the app containers, the downward API, and a status annotation that
makes a second injection a no-op.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .. import __version__
from ..errors import SidecarError

ANNOTATION_PREFIX = "sidecar.agents.io/"
INJECT = ANNOTATION_PREFIX + "inject"
STATUS = ANNOTATION_PREFIX + "status"
PROXY_ENV = ANNOTATION_PREFIX + "proxy-env"
AGENT_PORT = ANNOTATION_PREFIX + "agent-port"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
CONTAINER = "sidecar"
# The container port name that marks the local agent when no annotation names one.
AGENT_PORT_NAME = "agent"
UNPRIVILEGED_PORT_SYSCTL = "net.ipv4.ip_unprivileged_port_start"
DNS_POLICIES = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")
ADMIN_PORT, PROXY_PORT, GRPC_PORT, DNS_PORT = 15000, 15001, 15010, 53
CONFIG_DIR = "/etc/sidecar"

# What a controller writes on the pods it makes, read back to name the workload (Istio's heuristic, extended).
POD_TEMPLATE_HASH = "pod-template-hash"
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
STATEFULSET_POD_NAME = "statefulset.kubernetes.io/pod-name"
# A CronJob names each run "<cronjob>-<scheduled time in minutes since the epoch>" (8 digits until 2160).
CRONJOB_RUN = re.compile(r"(.+)-[0-9]{8,10}")
STATEFULSET_ORDINAL = re.compile(r"(.+)-[0-9]+")

# Pod-template annotations (after the prefix) that become ``sidecar run`` flags of the sidecar when the pod
# has a local agent (``agent-port``, or a container port named ``agent``); ``agent-name`` defaults to the app label.
ANNOTATION_FLAGS: tuple[tuple[str, str], ...] = (
    ("agent-health-url", "--agent-health-url"),
    ("agent-health-type", "--agent-health-type"),
    ("agent-card", "--agent-card"),
    ("agent-zone", "--agent-zone"),
    ("agent-weight", "--agent-weight"),
)
# Comma-separated annotations that become a repeated flag.
ANNOTATION_LISTS: tuple[tuple[str, str], ...] = (
    ("capabilities", "--agent-capability"),
    ("tags", "--agent-tag"),
)

# kind -> path of keys from the object to its pod template (metadata + spec); () is the Pod itself.
TEMPLATE_PATHS: Mapping[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

Action = Literal["injected", "already", "skipped", "passed", "refused"]


class InjectError(SidecarError):
    """Input that cannot be injected: not YAML, or an object or annotation that does not make sense."""


def default_etcd_endpoints(cluster_domain: str = "cluster.local") -> tuple[str, ...]:
    """The headless service of deploy/kubernetes/etcd.yaml: one name whose A records are every member.

    One name, not the members' names: the sidecar's gRPC channel resolves it itself, balances
    over every address and resolves again when members come back with new pod IPs. In the pod
    that resolution goes through the sidecar's own DNS (dnsPolicy None), which is up within a
    second of start and forwards the name to the cluster DNS.
    """
    return (f"http://etcd.sidecar-system.svc.{cluster_domain}:2379",)


@dataclass(frozen=True)
class InjectOptions:
    """What the injected sidecar looks like; the same for ``inject`` and ``webhook``."""

    # The cluster DNS service (kube-dns) as HOST[:PORT]: it cannot be read from YAML.
    upstream_dns: tuple[str, ...]
    image: str = f"sidecar:{__version__}"
    etcd_endpoints: tuple[str, ...] = field(default_factory=default_etcd_endpoints)
    domain: str = "agents.local"
    native: bool = True
    cluster_domain: str = "cluster.local"
    ndots: int = 5
    # Used for the DNS search path when an object names none (the webhook passes the request's).
    namespace: str = "default"
    # A ConfigMap holding sidecar.yaml, mounted at /etc/sidecar and passed as --config; empty: none.
    config_map: str = ""
    # A Secret with key "token" becoming SIDECAR_ADMIN_TOKEN when it exists (optional ref).
    admin_token_secret: str = "sidecar-admin-token"


@dataclass(frozen=True)
class Outcome:
    """What happened to one object: injected, already injected, skipped or refused (with why), passed through."""

    kind: str
    name: str
    action: Action
    reason: str = ""

    def __str__(self) -> str:
        what = {"injected": "injected", "already": "already injected, unchanged",
                "skipped": "skipped", "passed": "passed through", "refused": "refused"}[self.action]
        return f"{self.kind.lower() or 'document'}/{self.name or '<unnamed>'}: {what}" + \
            (f" ({self.reason})" if self.reason else "")


def inject_pod(original: Mapping[str, Any], options: InjectOptions, namespace: str | None = None,
               workload: tuple[str, str] | None = None) -> tuple[dict[str, Any], Outcome]:
    """A copy of ``original`` (``metadata`` + ``spec``: a Pod or a pod template) with the sidecar, and what was done.

    Never changes its argument. ``namespace`` overrides the pod's own (the webhook knows it from the request).
    ``workload`` is the (kind, name) whose template ``original`` is; for a Pod it is read from the pod
    (:func:`pod_workload`), so the webhook names a controller's pod's agent as ``inject`` names its template's.
    Raises InjectError, saying what is wrong but not naming the pod (the caller knows which it is).
    """
    pod: dict[str, Any] = copy.deepcopy(dict(original))
    meta = pod.get("metadata") or {}
    spec = pod.get("spec")
    name = _name(meta)
    if not isinstance(spec, dict) or not isinstance(meta, dict):
        raise InjectError("the pod has no spec mapping")
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise InjectError("metadata.annotations must be a mapping")
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        raise InjectError("metadata.labels must be a mapping")
    if _off(annotations.get(INJECT)):
        return pod, Outcome("Pod", name, "skipped", f"{INJECT}: {annotations[INJECT]}")
    # The label the webhook's objectSelector skips; here too, so that inject and the webhook agree without it.
    if _off(labels.get(INJECT)):
        return pod, Outcome("Pod", name, "skipped", f"label {INJECT}: {labels[INJECT]}")
    if spec.get("hostNetwork"):
        return pod, Outcome("Pod", name, "skipped", "hostNetwork pod: its DNS and ports are the node's")
    init = _list(spec, "initContainers")
    containers = _list(spec, "containers")
    if STATUS in annotations:
        return pod, Outcome("Pod", name, "already")
    if any(c.get("name") == CONTAINER for c in (*init, *containers)):
        return pod, Outcome("Pod", name, "already", f"it has a container named {CONTAINER!r}")
    if not containers:
        raise InjectError("spec.containers is empty")
    namespace = namespace or meta.get("namespace") or options.namespace

    upstreams, dns_note = _dns(spec, namespace, options)
    sidecar = _container(meta, annotations, containers, upstreams, options, workload or pod_workload(meta))
    if not options.native:
        spec["containers"] = [sidecar, *containers]
        annotations.setdefault(DEFAULT_CONTAINER, containers[0].get("name", ""))
    else:
        spec["initContainers"] = [sidecar, *init]
    if options.config_map:
        volumes = _list(spec, "volumes")
        spec["volumes"] = [*volumes, {"name": "sidecar-config", "configMap": {"name": options.config_map}}]
    if not _off(annotations.get(PROXY_ENV)):
        for container in containers:
            _proxy_env(container)
    _sysctl(spec)
    annotations[STATUS] = json.dumps({"version": __version__, "container": CONTAINER, "native": options.native},
                                     sort_keys=True)
    meta["annotations"] = annotations
    pod["metadata"] = meta
    notes = [dns_note] if dns_note else []
    if not options.native and spec.get("restartPolicy") in ("Never", "OnFailure"):
        # An ordinary container never exits by itself, so such a pod (a Job's) would never complete.
        notes.append(f"warning: restartPolicy {spec['restartPolicy']} with --no-native: the sidecar keeps the pod "
                     "running")
    return pod, Outcome("Pod", name, "injected", "; ".join(notes))


def inject_object(obj: Any, options: InjectOptions) -> tuple[Any, list[Outcome]]:
    """One YAML document: a workload gets the sidecar in its pod template, a ``List`` item by item, others as-is."""
    if not isinstance(obj, dict):
        return obj, [Outcome("", "", "passed", "not a Kubernetes object")]
    kind = str(obj.get("kind", ""))
    meta: dict[str, Any] = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
    name = _name(meta)
    if kind == "List":
        items = obj.get("items") or []
        if not isinstance(items, list):
            raise InjectError(f"list/{name}: items must be a list")
        out, outcomes = dict(obj), []
        out["items"] = []
        for item in items:
            new, done = inject_object(item, options)
            out["items"].append(new)
            outcomes.extend(done)
        return out, outcomes
    path = TEMPLATE_PATHS.get(kind)
    if path is None:
        return obj, [Outcome(kind, name, "passed", "not a workload")]
    template: Any = obj
    for key in path:
        template = template.get(key) if isinstance(template, dict) else None
    if not isinstance(template, dict):
        raise InjectError(f"{kind.lower()}/{name}: no pod template at .{'.'.join(path)}")
    try:
        # A pod template has no namespace of its own: its pods get the workload's.
        new_template, outcome = inject_pod(template, options, namespace=meta.get("namespace") if path else None,
                                           workload=(kind, str(meta.get("name") or "")) if path else None)
    except InjectError as exc:
        raise InjectError(f"{kind.lower()}/{name}: {exc}") from None
    outcome = Outcome(kind, name, outcome.action, outcome.reason)
    if outcome.action != "injected":
        return obj, [outcome]
    return _replace_at(obj, path, new_template), [outcome]


def inject_yaml(text: str, options: InjectOptions) -> tuple[str, list[Outcome]]:
    """A YAML stream (one or more documents) with every workload injected; unchanged text when nothing changed."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise InjectError(f"not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    results, outcomes = [], []
    for document in documents:
        if document is None:
            continue
        new, done = inject_object(document, options)
        results.append(new)
        outcomes.extend(done)
    if not any(o.action == "injected" for o in outcomes):
        return text, outcomes
    return yaml.safe_dump_all(results, sort_keys=False, explicit_start=True, width=1000), outcomes


def upstream(nameserver: str) -> str:
    """A nameserver (``10.96.0.10``, ``fd00::a``, ``10.96.0.10:53``) as the HOST:PORT ``--upstream-dns`` takes."""
    nameserver = nameserver.strip()
    if nameserver.startswith("[") or (nameserver.count(":") == 1 and nameserver.rsplit(":", 1)[1].isdigit()):
        return nameserver
    return f"[{nameserver}]:53" if ":" in nameserver else f"{nameserver}:53"


def _dns(spec: dict, namespace: str, options: InjectOptions) -> tuple[list[str], str]:
    """Point the pod's resolver at the sidecar; return the sidecar's upstreams (user nameservers kept there) and
    a note for the report when the pod's own policy cannot be kept exactly.

    ``ClusterFirst`` (and ``ClusterFirstWithHostNet``, the same for a pod without hostNetwork) gets what
    kubelet would write: the cluster search path and ``ndots``. ``None`` keeps the user's searches and
    options, and their nameservers replace the cluster DNS. ``Default`` (the node's resolv.conf) gets no
    cluster search path or ``ndots``, only the user's; the node's nameservers cannot be read from a pod
    spec, so the sidecar forwards to ``--upstream-dns`` (which it needs for etcd anyway) and then theirs.
    """
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    if policy not in DNS_POLICIES:
        raise InjectError(f"dnsPolicy {policy!r} is not one of {', '.join(DNS_POLICIES)}")
    config = dict(spec.get("dnsConfig") or {})
    own = [upstream(n) for n in config.get("nameservers") or []]
    flag = [upstream(n) for n in options.upstream_dns]
    # With dnsPolicy None the user chose every nameserver; otherwise theirs came on top of the cluster's or node's.
    upstreams = (own or flag) if policy == "None" else _unique([*flag, *own])
    config["nameservers"] = ["127.0.0.1"]
    note = ""
    if policy in ("ClusterFirst", "ClusterFirstWithHostNet"):
        cluster = options.cluster_domain
        searches = [f"{namespace}.svc.{cluster}", f"svc.{cluster}", cluster]
        config["searches"] = _unique([*searches, *(config.get("searches") or [])])
        opts = list(config.get("options") or [])
        if not any(isinstance(o, dict) and o.get("name") == "ndots" for o in opts):
            opts.insert(0, {"name": "ndots", "value": str(options.ndots)})
        config["options"] = opts
    elif policy == "Default":
        note = ("warning: dnsPolicy Default: no cluster searches or ndots added; the node's nameservers and "
                "searches are not in the pod spec, so the sidecar forwards to --upstream-dns "
                "(give others in dnsConfig)")
    spec["dnsPolicy"] = "None"
    spec["dnsConfig"] = config
    return upstreams, note


def _container(meta: dict, annotations: Mapping[str, Any], containers: Sequence[dict], upstreams: Sequence[str],
               options: InjectOptions, workload: tuple[str, str]) -> dict:
    args = ["run"]
    if options.config_map:
        args += ["--config", f"{CONFIG_DIR}/sidecar.yaml"]
    args += ["--etcd-endpoints", ",".join(options.etcd_endpoints), "--domain", options.domain,
             "--dns-listen", f"127.0.0.1:{DNS_PORT}", "--proxy-listen", f"127.0.0.1:{PROXY_PORT}",
             # kubelet probes and Prometheus reach the admin API on the pod IP.
             "--admin-listen", f"0.0.0.0:{ADMIN_PORT}", "--grpc-listen", f"127.0.0.1:{GRPC_PORT}"]
    if upstreams:
        args += ["--upstream-dns", ",".join(upstreams)]
    else:
        raise InjectError("no upstream DNS: pass --upstream-dns (the cluster DNS service IP)")
    port = _agent_port(annotations, containers)
    if port:
        agent = annotations.get(ANNOTATION_PREFIX + "agent-name") or _agent_name(meta, workload)
        args += ["--agent-name", str(agent), "--agent-id", "$(POD_NAME)", "--agent-port", str(port)]
        for suffix, flag in ANNOTATION_FLAGS:
            value = annotations.get(ANNOTATION_PREFIX + suffix)
            if value not in (None, ""):
                args += [flag, str(value)]
        for suffix, flag in ANNOTATION_LISTS:
            args += [arg for item in str(annotations.get(ANNOTATION_PREFIX + suffix) or "").split(",")
                     if item.strip() for arg in (flag, item.strip())]
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if options.admin_token_secret:
        env.append({"name": "SIDECAR_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": options.admin_token_secret, "key": "token", "optional": True}}})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": env,
        "ports": [
            {"name": "sidecar-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
            {"name": "sidecar-dns", "containerPort": DNS_PORT, "protocol": "UDP"},
            {"name": "sidecar-dns-tcp", "containerPort": DNS_PORT, "protocol": "TCP"},
        ],
        # Native sidecar: app containers start only once this passes, i.e. the first snapshot has synced.
        "startupProbe": {"httpGet": {"path": "/readyz", "port": ADMIN_PORT}, "periodSeconds": 1,
                         "failureThreshold": 120},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": ADMIN_PORT}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": ADMIN_PORT}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": 1337, "runAsGroup": 1337, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if options.config_map:
        container["volumeMounts"] = [{"name": "sidecar-config", "mountPath": CONFIG_DIR, "readOnly": True}]
    if options.native:
        container["restartPolicy"] = "Always"
    return container


def _agent_port(annotations: Mapping[str, Any], containers: Sequence[dict]) -> int | None:
    """The local agent's port: the annotation (a number or a port name), else the port named ``agent``."""
    wanted = str(annotations.get(AGENT_PORT) or "")
    ports: dict[str, int] = {str(p["name"]): p["containerPort"] for c in containers for p in (c.get("ports") or [])
             if isinstance(p, dict) and p.get("name") and isinstance(p.get("containerPort"), int)}
    if wanted.isdigit() and 0 < int(wanted) < 65536:
        return int(wanted)
    if wanted:
        if wanted not in ports:
            raise InjectError(f"{AGENT_PORT}: {wanted!r} is neither a port number nor a named container "
                              f"port (named: {', '.join(sorted(ports)) or 'none'})")
        return ports[wanted]
    return ports.get(AGENT_PORT_NAME)


def _agent_name(meta: Mapping[str, Any], workload: tuple[str, str]) -> str:
    labels = meta.get("labels") or {}
    for key in ("app.kubernetes.io/name", "app"):
        if labels.get(key):
            return str(labels[key])
    return workload_name(*workload, labels) or "agent"


def pod_workload(meta: Mapping[str, Any]) -> tuple[str, str]:
    """(kind, name) of what made the pod, from its metadata as its controller wrote it; ("Pod", name) if none did.

    The controller's ownerReference, else the Job or StatefulSet pod labels, else ``generateName``
    without its trailing ``-``, else the pod's own name. :func:`workload_name` then maps a
    Deployment's ReplicaSet and a CronJob's Job to the object a user wrote.
    """
    labels = meta.get("labels") or {}
    for owner in meta.get("ownerReferences") or []:
        if isinstance(owner, Mapping) and owner.get("controller") is True and owner.get("name"):
            return str(owner.get("kind") or ""), str(owner["name"])
    for key in JOB_NAME_LABELS:
        if labels.get(key):
            return "Job", str(labels[key])
    ordinal = STATEFULSET_ORDINAL.fullmatch(str(labels.get(STATEFULSET_POD_NAME) or ""))
    if ordinal:
        return "StatefulSet", ordinal.group(1)
    if meta.get("generateName"):
        return "Pod", str(meta["generateName"]).rstrip("-")
    return "Pod", str(meta.get("name") or "")


def workload_name(kind: str, name: str, labels: Mapping[str, Any]) -> str:
    """The name of the object a user wrote behind ``kind``/``name``: a Deployment's for its ReplicaSet (the
    name less ``-<pod-template-hash>``), a CronJob's for its Job (less ``-<8 to 10 digits>``), else ``name``."""
    template_hash = str(labels.get(POD_TEMPLATE_HASH) or "")
    if template_hash and name.endswith("-" + template_hash):
        return name[:-len(template_hash) - 1]
    run = CRONJOB_RUN.fullmatch(name) if kind == "Job" else None
    return run.group(1) if run else name


def _proxy_env(container: dict) -> None:
    """HTTP_PROXY at the sidecar and NO_PROXY for loopback, both spellings; a variable the user set wins, and
    then so does its other spelling (a user ``HTTP_PROXY`` gets no ``http_proxy`` of ours beside it)."""
    env = _list(container, "env")
    present = {str(e.get("name", "")).upper() for e in env if isinstance(e, dict)}
    added = [{"name": spelling, "value": value}
             for variable, value in (("HTTP_PROXY", f"http://127.0.0.1:{PROXY_PORT}"),
                                     ("NO_PROXY", "localhost,127.0.0.1,::1"))
             if variable not in present for spelling in (variable, variable.lower())]
    if added:
        container["env"] = [*env, *added]


def _sysctl(spec: dict) -> None:
    """Let the non-root sidecar bind 127.0.0.1:53 (NET_BIND_SERVICE needs privilege escalation for non-root)."""
    context = dict(spec.get("securityContext") or {})
    sysctls = [dict(s) for s in context.get("sysctls") or []]
    for item in sysctls:
        if item.get("name") == UNPRIVILEGED_PORT_SYSCTL:
            if not str(item.get("value", "")).isdigit() or int(item["value"]) > DNS_PORT:
                item["value"] = str(DNS_PORT)
            break
    else:
        sysctls.append({"name": UNPRIVILEGED_PORT_SYSCTL, "value": str(DNS_PORT)})
    context["sysctls"] = sysctls
    spec["securityContext"] = context


def _off(value: Any) -> bool:
    return str(value or "").lower() in ("disabled", "false", "no", "off")


def _list(node: dict, key: str) -> list:
    value = node.get(key) or []
    if not isinstance(value, list):
        raise InjectError(f"{key} must be a list (got {type(value).__name__})")
    return value


def _name(meta: Any) -> str:
    if not isinstance(meta, dict):
        return ""
    return str(meta.get("name") or meta.get("generateName") or "")


def _unique(items: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def _replace_at(obj: dict, path: Sequence[str], value: Any) -> dict:
    if not path:
        return value
    out = dict(obj)
    out[path[0]] = _replace_at(obj[path[0]], path[1:], value)
    return out
