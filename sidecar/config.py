"""Inert, validated settings: one frozen dataclass per subsystem.

The YAML file keeps the original layout (sections under ``service_discovery:``);
the dynamic document in etcd has the same sections at its top level. Every
value is checked once, here: an unknown key or a bad value raises ConfigError
naming the dotted key and the value.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from .cards import MAX_CARD_BYTES
from .errors import ConfigError, ValidationError
from .model import parse_agent, parse_duration

Duration = typing.Annotated[float, "duration"]
# HOST:PORT or [V6]:PORT; port 0 asks the kernel for a free one (tests).
Listen = typing.Annotated[str, "listen"]
# http:// or https:// host:port URLs, not mixed (a bare host:port is read as http://).
Endpoints = typing.Annotated[tuple[str, ...], "endpoints"]
# IP[:PORT] resolvers (port 53 by default), or the single word "none".
Upstreams = typing.Annotated[tuple[str, ...], "upstreams"]
FORWARDING_OFF = "none"
# An HTTP header name: an RFC 7230 token.
HeaderName = typing.Annotated[str, "header"]
# A cookie name: an RFC 6265 cookie-name, which is the same token (never "=", ";", spaces or control bytes).
CookieName = typing.Annotated[str, "cookie"]
# The zone served: a DNS name of LDH labels (RFC 1035 / 1123), e.g. agents.local.
Domain = typing.Annotated[str, "domain"]
# The etcd key prefix: empty, or [/]segment[/segment...] (keys are {prefix}/services/..., {prefix}/config/...).
Prefix = typing.Annotated[str, "prefix"]


class HostPort(NamedTuple):
    """A validated (host, port); the one parser of every listen and upstream address."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, key: str = "address", default_port: int | None = None) -> HostPort:
        """``HOST:PORT``, ``[V6]:PORT`` (or, with ``default_port``, a bare host or IPv6 address)."""
        raw = text
        text = text.strip()
        example = "HOST:PORT, e.g. 127.0.0.1:15053 or [::1]:15053"
        if text.startswith("["):
            host, closed, rest = text[1:].partition("]")
            if not closed or (rest and not rest.startswith(":")):
                raise ConfigError(key, raw, f"must be {example}")
            port_text = rest[1:] if rest else ""
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        elif default_port is not None and (text.count(":") == 0 or _is_ip(text)):
            host, port_text = text, ""
        else:
            raise ConfigError(key, raw, f"must be {example}")
        if not host:
            raise ConfigError(key, raw, f"needs a host: {example}")
        if port_text == "":
            if default_port is None:
                raise ConfigError(key, raw, f"needs a port: {example}")
            return cls(host, default_port)
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ConfigError(key, raw, "the port must be a number from 0 to 65535")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def parse_endpoints(endpoints: typing.Sequence[str], key: str = "etcd.endpoints") -> list[tuple[str, int]]:
    """(host, port) of each ``http://host:port`` (or bare ``host:port``) etcd endpoint."""
    parsed = []
    for endpoint in endpoints:
        text = endpoint.strip()
        if not text:
            continue
        url = urlsplit(text if "://" in text else f"http://{text}")
        if url.scheme not in ("http", "https"):
            raise ConfigError(key, endpoint, "must be http://host:port or https://host:port")
        try:
            port = url.port or 2379
        except ValueError:
            raise ConfigError(key, endpoint, "bad port") from None
        if not url.hostname:
            raise ConfigError(key, endpoint, "missing host")
        if url.path not in ("", "/") or url.query:
            raise ConfigError(key, endpoint, "must be http://host:port, without a path")
        parsed.append((url.hostname, port))
    if not parsed:
        raise ConfigError(key, list(endpoints), "at least one endpoint is needed")
    return parsed


def _opt(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
         restart: bool = False, **kw: Any) -> Any:
    # restart: read once at start; a change at run time is reported as "needs restart".
    meta = {"min": min, "max": max, "restart": restart}
    if isinstance(default, Mapping):
        items = dict(default)
        return field(default_factory=lambda: MappingProxyType(dict(items)), metadata=meta, **kw)
    if dataclasses.is_dataclass(default):
        # A fresh section per instance (every nested default is the section's own defaults).
        section: Any = type(default)
        assert default == section(), "nested defaults are default-constructed sections"
        return field(default_factory=section, metadata=meta, **kw)
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: Endpoints = _opt(("http://127.0.0.1:2379",), restart=True)
    prefix: Prefix = _opt("", restart=True)
    dial_timeout: Duration = _opt(5.0, min=0.1, restart=True)
    request_timeout: Duration = _opt(5.0, min=0.1, restart=True)
    # How often the member list is read to dial added members and drop removed ones (0: never).
    auto_sync_interval: Duration = _opt(30.0, min=0.0, restart=True)
    username: str = _opt("", restart=True)
    password: str = _opt("", restart=True)
    # TLS (https:// endpoints): the CA that signed etcd's certificate (empty: the system's roots),
    # and a client certificate and key when etcd asks for one (--client-cert-auth).
    ca_file: str = _opt("", restart=True)
    cert_file: str = _opt("", restart=True)
    key_file: str = _opt("", restart=True)

    def __post_init__(self) -> None:
        schemes = {urlsplit(e if "://" in e else f"http://{e}").scheme for e in self.endpoints}
        if len(schemes) > 1:
            raise ConfigError("etcd.endpoints", list(self.endpoints), "mixes http:// and https://")
        tls = schemes == {"https"}
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, key)
            if value and not tls:
                raise ConfigError(f"etcd.{key}", value, "needs https:// endpoints")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("etcd.key_file" if self.cert_file else "etcd.cert_file", "",
                              "a client certificate needs both cert_file and key_file")
        if bool(self.username) != bool(self.password):
            raise ConfigError("etcd.password" if self.username else "etcd.username", "",
                              "etcd authentication needs both username and password")

    @property
    def tls(self) -> bool:
        """Whether the endpoints are https://."""
        return any(e.startswith("https://") for e in self.endpoints)


@dataclass(frozen=True)
class RegistrySettings:
    default_ttl: Duration = _opt(10.0, min=2.0)
    # 0 means a third of each lease's TTL.
    refresh_interval: Duration = _opt(0.0, min=0.0)

    def __post_init__(self) -> None:
        if self.refresh_interval and self.refresh_interval >= self.default_ttl:
            raise ConfigError("registry.refresh_interval", self.refresh_interval,
                              f"must be shorter than registry.default_ttl ({self.default_ttl:g}s)")


@dataclass(frozen=True)
class OutlierSettings:
    """Passive health: agents the proxy sees failing are ejected from its picks for a while."""

    enabled: bool = True
    consecutive_failures: int = _opt(5, min=1)
    base_ejection_time: Duration = _opt(30.0, min=0.1)
    max_ejection_time: Duration = _opt(300.0, min=0.1)
    # Never eject more than this share of one capability's agents.
    max_ejection_share: float = _opt(0.5, min=0.0, max=1.0)

    def __post_init__(self) -> None:
        if self.max_ejection_time < self.base_ejection_time:
            raise ConfigError("health_check.outlier_detection.max_ejection_time", self.max_ejection_time,
                              f"must be at least base_ejection_time ({self.base_ejection_time:g}s)")


@dataclass(frozen=True)
class HealthCheckSettings:
    interval: Duration = _opt(2.0, min=0.1, max=5.0)
    timeout: Duration = _opt(1.0, min=0.05)
    failure_threshold: int = _opt(3, min=1)
    success_threshold: int = _opt(2, min=1)
    # Serve every agent of a capability when all of them are unhealthy (Envoy's panic mode).
    panic: bool = False
    drain_period: Duration = _opt(2.0, min=0.0)
    outlier_detection: OutlierSettings = _opt(OutlierSettings())


@dataclass(frozen=True)
class CircuitBreakerSettings:
    enabled: bool = True
    failure_threshold: int = _opt(5, min=1)
    timeout: Duration = _opt(30.0, min=0.1)
    half_open_requests: int = _opt(1, min=1)
    # Any 5xx, as Envoy's outlier detection and Linkerd's failure accrual count.
    failure_statuses: tuple[int, ...] = tuple(range(500, 600))

    def __post_init__(self) -> None:
        for status in self.failure_statuses:
            if not 100 <= status <= 599:
                raise ConfigError("load_balancer.circuit_breaker.failure_statuses", status,
                                  "must be HTTP statuses (100-599)")


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = _opt(2, min=0, max=10)
    budget: float = _opt(0.2, min=0.0, max=1.0)
    min_retries_per_second: float = _opt(10.0, min=0.0)


Algorithm = Literal["round_robin", "weighted_random", "least_conn", "consistent_hash", "p2c_ewma"]


@dataclass(frozen=True)
class LoadBalancerSettings:
    algorithm: Algorithm = "weighted_random"
    zone_preference: bool = False
    per_capability: Mapping[str, Algorithm] = _opt({})
    hash_header: HeaderName = "X-Session-Id"
    # Empty: no cookie is hashed.
    hash_cookie: typing.Annotated[str, "cookie", "or empty"] = ""
    circuit_breaker: CircuitBreakerSettings = _opt(CircuitBreakerSettings())
    retries: RetrySettings = _opt(RetrySettings())

    def __post_init__(self) -> None:
        for capability in self.per_capability:
            if not capability.strip():
                raise ConfigError("load_balancer.per_capability", capability, "needs a capability name")


@dataclass(frozen=True)
class DnsSettings:
    listen: Listen = _opt("127.0.0.1:15053", restart=True)
    domain: Domain = _opt("agents.local", restart=True)
    ttl: int = _opt(5, min=0, max=86400)
    negative_ttl: int = _opt(5, min=0, max=86400)
    # Empty: the nameservers of /etc/resolv.conf; ("none",) turns forwarding off.
    upstreams: Upstreams = ()
    upstream_timeout: Duration = _opt(2.0, min=0.05)
    a_mode: Literal["direct", "proxy"] = "direct"
    # 4096 at most: larger UDP answers fragment, and resolvers offer no more (RFC 6891 suggests 4096).
    max_udp_payload: int = _opt(4096, min=512, max=4096)
    tcp_idle_timeout: Duration = _opt(10.0, min=0.1)
    # SO_RCVBUF asked for the UDP listener (bytes; 0: the kernel's default); Linux caps it at net.core.rmem_max.
    udp_receive_buffer: int = _opt(4 << 20, min=0, max=1 << 30, restart=True)
    # Upstream responses kept for forwarded questions (0: none), each for at most cache_max_ttl seconds.
    cache_size: int = _opt(10000, min=0)
    cache_max_ttl: int = _opt(300, min=0, max=86400)


@dataclass(frozen=True)
class ProxySettings:
    listen: Listen = _opt("127.0.0.1:15001", restart=True)
    passthrough: bool = True
    connect_timeout: Duration = _opt(2.0, min=0.01)
    # Per phase (time to response head, then idle time between body bytes); no total timeout.
    read_timeout: Duration = _opt(60.0, min=0.01)
    # A text/event-stream response that sends nothing for this long, or a tunnel (Upgrade, CONNECT) that
    # passes no byte either way for this long, is ended.
    stream_idle_timeout: Duration = _opt(300.0, min=0.1)
    idle_timeout: Duration = _opt(60.0, min=0.1)
    max_header_bytes: int = _opt(65536, min=1024)
    max_concurrency: int = _opt(10000, min=1)
    max_concurrency_per_agent: int = _opt(1000, min=1)
    rate_limit: float = _opt(0.0, min=0.0)
    rate_burst: int = _opt(0, min=0)
    # One JSON line per proxied request on the "sidecar.access" logger.
    access_log: bool = False


@dataclass(frozen=True)
class A2aSettings:
    """A2A-aware routing: agent cards in the registry, task and context affinity in the proxy."""

    # JSON-RPC bodies up to this size are read for task/context ids; larger ones pass untouched.
    max_body: int = _opt(1 << 20, min=1024)
    # Cards larger than this are refused (logged and counted); the agent stays registered.
    max_card_bytes: int = _opt(MAX_CARD_BYTES, min=1024, max=16 << 20)
    # How often the local agent's card is read again (a conditional GET); at least the check interval.
    card_refresh: Duration = _opt(30.0, min=1.0)
    # Task -> agent and context -> agent entries: forgotten after this idle time, at most this many each.
    ttl: Duration = _opt(3600.0, min=1.0)
    max_tasks: int = _opt(100_000, min=16)
    max_contexts: int = _opt(100_000, min=16)


@dataclass(frozen=True)
class StickySettings:
    enabled: bool = True
    cookie: CookieName = "sidecar_affinity"
    header: HeaderName = "X-Session-Id"
    cookie_max_age: Duration = _opt(3600.0, min=0.0)


@dataclass(frozen=True)
class AdminSettings:
    listen: Listen = _opt("127.0.0.1:15000", restart=True)
    token: str = ""


@dataclass(frozen=True)
class GrpcSettings:
    listen: Listen = _opt("127.0.0.1:15010", restart=True)


@dataclass(frozen=True)
class TracingSettings:
    """OpenTelemetry spans over OTLP/HTTP; off while ``otlp_endpoint`` is empty."""

    # e.g. http://127.0.0.1:4318/v1/traces
    otlp_endpoint: str = ""
    sample_ratio: float = _opt(0.01, min=0.0, max=1.0)
    service_name: str = "sidecar"
    export_timeout: Duration = _opt(5.0, min=0.1)

    def __post_init__(self) -> None:
        if self.otlp_endpoint:
            url = urlsplit(self.otlp_endpoint)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError("tracing.otlp_endpoint", self.otlp_endpoint,
                                  "must be an OTLP/HTTP URL, e.g. http://127.0.0.1:4318/v1/traces")


@dataclass(frozen=True)
class AgentHealthSettings:
    type: Literal["http", "tcp", "grpc"] = "http"
    url: str = ""


@dataclass(frozen=True)
class AgentSettings:
    name: str = ""
    id: str = ""
    address: str = ""
    port: int = _opt(0, min=0, max=65535)
    version: str = ""
    protocol: str = "http"
    capabilities: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = _opt({})
    weight: int = _opt(100, min=0, max=65535)
    zone: str = ""
    ttl: Duration = _opt(10.0, min=2.0)
    card: str = ""
    health: AgentHealthSettings = _opt(AgentHealthSettings())

    @property
    def enabled(self) -> bool:
        """Whether ``sidecar run`` has a local agent to register."""
        return bool(self.name or self.port or self.card)

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if not self.card and not self.port:
            raise ConfigError("agent.port", self.port, "set the local agent's port (or --agent-card)")
        if self.health.url:
            url = urlsplit(self.health.url)
            wanted = {"http": ("http", "https"), "grpc": ("grpc", "http", "")}.get(self.health.type)
            if wanted is not None and url.scheme not in wanted:
                raise ConfigError("agent.health.url", self.health.url,
                                  f"a {self.health.type} check needs a {wanted[0]}:// URL")
        try:
            parse_agent({"name": self.name or "agent", "id": self.id or "check", "address": self.address or "127.0.0.1",
                         "port": self.port or 1, "version": self.version, "protocol": self.protocol,
                         "capabilities": list(self.capabilities), "tags": list(self.tags),
                         "metadata": dict(self.metadata), "weight": self.weight, "zone": self.zone,
                         "ttl": f"{self.ttl}s"}, strict=True)
        except ValidationError as exc:
            first = exc.errors[0]
            raise ConfigError(f"agent.{first.field}", first.value, first.reason) from None


@dataclass(frozen=True)
class Settings:
    """Everything ``sidecar run`` needs; built once from flag > env > file > default."""

    etcd: EtcdSettings = _opt(EtcdSettings())
    registry: RegistrySettings = _opt(RegistrySettings())
    health_check: HealthCheckSettings = _opt(HealthCheckSettings())
    load_balancer: LoadBalancerSettings = _opt(LoadBalancerSettings())
    dns: DnsSettings = _opt(DnsSettings())
    proxy: ProxySettings = _opt(ProxySettings())
    sticky: StickySettings = _opt(StickySettings())
    a2a: A2aSettings = _opt(A2aSettings())
    admin: AdminSettings = _opt(AdminSettings())
    grpc: GrpcSettings = _opt(GrpcSettings())
    agent: AgentSettings = _opt(AgentSettings(), restart=True)
    tracing: TracingSettings = _opt(TracingSettings(), restart=True)
    loop: Literal["uvloop", "asyncio"] = _opt("uvloop", restart=True)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # text: one human line per record; json: one JSON object per line (with trace_id when in a span).
    log_format: Literal["text", "json"] = _opt("text", restart=True)

    def __post_init__(self) -> None:
        if self.dns.a_mode == "proxy":
            host = HostPort.parse(self.proxy.listen, "proxy.listen").host
            if not _is_ip(host) or ipaddress.ip_address(host).is_unspecified:
                raise ConfigError("dns.a_mode", "proxy", f"needs proxy.listen on a specific IP address (got {host})")
        bound: dict[HostPort, str] = {}
        for key, listen in (("admin.listen", self.admin.listen), ("proxy.listen", self.proxy.listen),
                            ("grpc.listen", self.grpc.listen)):
            address = HostPort.parse(listen, key)
            if address.port and address in bound:
                raise ConfigError(key, listen, f"is also {bound[address]}")
            bound[address] = key


def changes(old: Any, new: Any, path: str = "", restart: bool = False) -> Iterator[tuple[str, bool]]:
    """(dotted key, needs restart) for every setting that differs between two settings objects."""
    for f in dataclasses.fields(old):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        key = f"{path}{f.name}"
        needs_restart = restart or bool(f.metadata.get("restart"))
        if dataclasses.is_dataclass(before):
            yield from changes(before, after, key + ".", needs_restart)
        else:
            yield key, needs_restart


def live_keys(schema: type[Any], path: str = "") -> Iterator[str]:
    """The dotted keys of ``schema`` that change at run time (not marked restart, nor in a section that is)."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.metadata.get("restart"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from live_keys(hints[f.name], f"{path}{f.name}.")
        else:
            yield f"{path}{f.name}"


def to_document(settings: Any) -> dict[str, Any]:
    """A settings object as plain JSON-able data (the document layout: sections at top level)."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return typing.cast(dict[str, Any], plain(settings))


def build(cls: type[Any], data: Mapping[str, Any] | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, validating every key and value."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path.rstrip(".") or "<document>", data, "must be a mapping")
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            close = ", ".join(sorted(known))
            raise ConfigError(f"{path}{key}", data[key], f"unknown key (known: {close})")
    values = {}
    for name, value in data.items():
        f = known[name]
        values[name] = _coerce(hints[name], value, f"{path}{name}", f.metadata)
    return cls(**values)


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested mappings; ``override`` wins."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(hint: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        base, *marks = typing.get_args(hint)
        if "duration" in marks:
            try:
                seconds = _duration(value)
            except ValueError as exc:
                raise ConfigError(key, value, f"must be a duration like 5s or 500ms ({exc})") from None
            return _bounded(seconds, key, value, meta)
        coerced = _coerce(base, value, key, meta)
        if "listen" in marks:
            HostPort.parse(coerced, key)
        elif "endpoints" in marks:
            parse_endpoints(coerced, key)
        elif "upstreams" in marks:
            _check_upstreams(coerced, key)
        elif "header" in marks:
            _check_token(coerced, key, "an HTTP header name (RFC 7230 token)")
        elif "cookie" in marks and (coerced or "or empty" not in marks):
            _check_token(coerced, key, "a cookie name (RFC 6265 token)")
        elif "domain" in marks:
            _check_domain(coerced, key)
        elif "prefix" in marks:
            _check_prefix(coerced, key)
        return coerced
    if dataclasses.is_dataclass(hint):
        return build(typing.cast(type, hint), value, key + ".")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(key, value, "must be one of " + ", ".join(map(str, choices)))
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(key, value, "must be true or false")
    if hint is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return _bounded(value, key, value, meta)
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "must be a number")
        return _bounded(float(value), key, value, meta)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "must be a list")
        return tuple(_coerce(item, v, f"{key}[{i}]", {}) for i, v in enumerate(value))
    if origin in (Mapping, dict):
        item = typing.get_args(hint)[1]
        if isinstance(value, str):
            pairs = [p for p in value.split(",") if p.strip()]
            if not all("=" in p for p in pairs):
                raise ConfigError(key, value, "must be a mapping or k=v,k2=v2")
            value = dict(p.split("=", 1) for p in pairs)
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, "must be a mapping")
        return MappingProxyType({str(k): _coerce(item, v, f"{key}.{k}", {}) for k, v in value.items()})
    raise ConfigError(key, value, f"unsupported setting type {hint!r}")  # pragma: no cover


# RFC 7230 tchar: what a header name (and an RFC 6265 cookie name) is made of.
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_LABEL = frozenset("-0123456789abcdefghijklmnopqrstuvwxyz")


def _check_token(value: str, key: str, what: str) -> None:
    if not value or not _TOKEN.issuperset(value):
        raise ConfigError(key, value, f"must be {what}: letters, digits and !#$%&'*+-.^_`|~, not empty")


def _check_domain(value: str, key: str) -> None:
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253:
        raise ConfigError(key, value, "must be a DNS name of 1 to 253 characters, e.g. agents.local")
    for part in name.split("."):
        if not 1 <= len(part) <= 63 or not _LABEL.issuperset(part.lower()) or part[0] == "-" or part[-1] == "-":
            raise ConfigError(key, value, "must be a DNS name: labels of 1 to 63 letters, digits and inner "
                              "hyphens, separated by dots, e.g. agents.local")


def _check_prefix(value: str, key: str) -> None:
    # A leading / is usual (etcd keys are plain bytes, so ``prod`` works too and is kept as given); a
    # trailing / or an empty segment would make keys like /prod//services/... that no other tool expects.
    if value and (value.endswith("/") or "//" in value or any(c.isspace() or not c.isprintable() for c in value)):
        raise ConfigError(key, value, "must be empty or [/]name[/name...] (no trailing /, no empty segment), "
                          "e.g. /prod: keys are {prefix}/services/...")


def _check_upstreams(upstreams: tuple[str, ...], key: str) -> None:
    if any(u.lower() == FORWARDING_OFF for u in upstreams):
        if len(upstreams) != 1:
            raise ConfigError(key, list(upstreams), f"{FORWARDING_OFF!r} turns forwarding off and stands alone")
        return
    for i, upstream in enumerate(upstreams):
        host, _ = HostPort.parse(upstream, f"{key}[{i}]", default_port=53)
        if not _is_ip(host):
            raise ConfigError(f"{key}[{i}]", upstream, "must be an IP address (a resolver cannot be found by name)")


def _duration(value: Any) -> float:
    # Config durations are seconds when bare numbers ("5" or 5), Go strings otherwise.
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("negative")
        return float(value)
    if isinstance(value, str):
        try:
            return _duration(float(value))
        except ValueError:
            return parse_duration(value)
    raise ValueError("not a duration")


def _bounded(number: float, key: str, raw: Any, meta: Mapping[str, Any]) -> Any:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and number < low:
        raise ConfigError(key, raw, f"must be at least {low:g}")
    if high is not None and number > high:
        raise ConfigError(key, raw, f"must be at most {high:g}")
    return number


def load_file_document(data: Any, source: str) -> dict[str, Any]:
    """The sections of a parsed YAML file (under ``service_discovery:`` or at top level)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(source, data, "the file must hold a mapping")
    extra = {k: v for k, v in data.items() if k != "service_discovery"}
    sections = data.get("service_discovery", {})
    if sections is None:
        sections = {}
    if not isinstance(sections, Mapping):
        raise ConfigError("service_discovery", sections, "must be a mapping")
    return merge(dict(sections), extra)
