"""The agent record: Go-compatible JSON, DNS labels, validation.

The JSON is wire-compatible with the original Go struct (``ServiceInstance``):
durations are integer nanoseconds (``"30s"`` strings are read too),
``register_time`` is RFC 3339, nil slices and maps may arrive as ``null``.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import socket
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from .errors import FieldError, ValidationError

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
UNKNOWN = "unknown"
STATUSES = (HEALTHY, UNHEALTHY, UNKNOWN)
CHECK_TYPES = ("", "http", "tcp", "grpc")
MIN_TTL = 2.0
DEFAULT_TTL = 10.0
DEFAULT_WEIGHT = 100
MAX_LABEL = 63

_NON_LABEL = re.compile(r"[^a-z0-9-]")
_HOST_LABEL = r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_HOST_LABEL}(\.{_HOST_LABEL})*\.?$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_FRACTION = re.compile(r"(\.\d{6})\d+")


@functools.lru_cache(maxsize=65536)
def label(text: str) -> str:
    """Map a capability, tag, name or id to its DNS label: lower case, [a-z0-9-] only."""
    return sys.intern(_NON_LABEL.sub("-", text.lower()))


@functools.lru_cache(maxsize=4096)
def _labels(texts: tuple[str, ...]) -> tuple[str, ...]:
    # Agents mostly share their capability and tag lists: one tuple/frozenset serves them all.
    return tuple(dict.fromkeys(label(t) for t in texts))


@functools.lru_cache(maxsize=4096)
def _label_set(texts: tuple[str, ...]) -> frozenset[str]:
    return frozenset(_labels(texts))


def parse_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address in ``address``, or None for a host name (inet_pton: fast and strict)."""
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, address))
    except OSError:
        pass
    try:
        return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, address))
    except OSError:
        return None


LOAD_KEY = "load"


def parse_load(text: str) -> float:
    """An agent's published load: a share of capacity (``0.7``) or in-flight/capacity (``3/8``), clamped
    to 0..1; anything else is 0 (no signal)."""
    try:
        if "/" in text:
            used, _, capacity = text.partition("/")
            value = float(used) / float(capacity)
        else:
            value = float(text) if text else 0.0
    except (ValueError, ZeroDivisionError):
        return 0.0
    if value != value:  # NaN
        return 0.0
    return min(1.0, max(0.0, value))


def parse_duration(value: object) -> float:
    """Seconds from Go's integer nanoseconds or a Go duration string ("1m30s", "500ms").

    Raises ValueError for anything else, including negative values.
    """
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int):
        seconds = value / 1e9
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("not a finite duration")
        seconds = value / 1e9
    elif isinstance(value, str):
        text = value.strip()
        if text == "0":
            return 0.0
        if not text:
            raise ValueError("empty duration")
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                raise ValueError(f"bad duration {value!r}")
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(text):
            raise ValueError(f"bad duration {value!r} (use e.g. 10s, 500ms, 1m30s)")
    else:
        raise ValueError("not a duration")
    if seconds < 0:
        raise ValueError("negative duration")
    return seconds


def to_nanoseconds(seconds: float) -> int:
    """Go's time.Duration encoding of a number of seconds."""
    return round(seconds * 1e9)


def now_rfc3339() -> str:
    """The current time as Go's time.Time marshals it (UTC, RFC 3339, nanoseconds trimmed)."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp as Go writes it (up to nanoseconds, Z or offset)."""
    return datetime.fromisoformat(_FRACTION.sub(r"\1", text.strip()).replace("Z", "+00:00").replace("z", "+00:00"))


@dataclass(frozen=True, slots=True)
class Health:
    type: str = ""
    url: str = ""
    interval: float = 0.0
    timeout: float = 0.0
    status: str = UNKNOWN

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "url": self.url,
            "interval": to_nanoseconds(self.interval),
            "timeout": to_nanoseconds(self.timeout),
            "status": self.status,
        }


@dataclass(frozen=True, slots=True)
class Agent:
    """One registered agent. Build with ``parse_agent``; the labels are derived."""

    id: str
    name: str
    address: str
    port: int
    version: str = ""
    protocol: str = "http"
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    health: Health = field(default_factory=Health)
    capabilities: tuple[str, ...] = ()
    register_time: str = ""
    ttl: float = DEFAULT_TTL
    weight: int = DEFAULT_WEIGHT
    zone: str = ""
    # Derived, never read from JSON.
    id_label: str = field(init=False, compare=False, repr=False)
    name_label: str = field(init=False, compare=False, repr=False)
    capability_labels: tuple[str, ...] = field(init=False, compare=False, repr=False)
    tag_labels: frozenset[str] = field(init=False, compare=False, repr=False)
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = field(init=False, compare=False, repr=False)
    # metadata["load"] as a share of capacity in use, 0..1 (0 when absent or unreadable).
    load: float = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "id_label", label(self.id))
        setattr_(self, "name_label", label(self.name))
        setattr_(self, "capability_labels", _labels(self.capabilities))
        setattr_(self, "tag_labels", _label_set(self.tags))
        setattr_(self, "ip", parse_ip(self.address))
        setattr_(self, "load", parse_load(self.metadata.get(LOAD_KEY, "")))

    @property
    def healthy(self) -> bool:
        """Served unless explicitly unhealthy (absent or unknown status is served)."""
        return self.health.status != UNHEALTHY

    def key(self, prefix: str) -> str:
        """The etcd key of this agent under ``prefix``."""
        return f"{prefix}/services/{self.name}/{self.id}"

    def with_status(self, status: str) -> Agent:
        """A copy with another health status."""
        return replace(self, health=replace(self.health, status=status))

    def to_json(self) -> dict[str, Any]:
        """The Go-compatible JSON object (durations in nanoseconds)."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "address": self.address,
            "port": self.port,
            "protocol": self.protocol,
            "tags": list(self.tags),
            "metadata": dict(self.metadata),
            "health": self.health.to_json(),
            "capabilities": list(self.capabilities),
            "register_time": self.register_time,
            "ttl": to_nanoseconds(self.ttl),
            "weight": self.weight,
            "zone": self.zone,
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


_AGENT_FIELDS = frozenset(
    ("id", "name", "version", "address", "port", "protocol", "tags", "metadata", "health",
     "capabilities", "register_time", "ttl", "weight", "zone")
)
_HEALTH_FIELDS = frozenset(("type", "url", "interval", "timeout", "status"))


class _Fields:
    """Collects every bad field of one record instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def bad(self, name: str, value: object, reason: str) -> None:
        self.errors.append(FieldError(name, value, reason))

    def string(self, data: Mapping[str, Any], name: str, default: str = "", path: str = "") -> str:
        value = data.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            self.bad(path + name, value, "must be a string")
            return default
        return sys.intern(value) if len(value) <= 64 else value

    def strings(self, data: Mapping[str, Any], name: str) -> tuple[str, ...]:
        value = data.get(name)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.bad(name, value, "must be a list of strings")
            return ()
        return _unique(tuple(value))

    def duration(self, data: Mapping[str, Any], name: str, default: float, path: str = "") -> float:
        value = data.get(name)
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.bad(path + name, value, f"must be a duration (nanoseconds or e.g. \"10s\"): {exc}")
            return default


def parse_agent(data: object, *, strict: bool = False, default_ttl: float = DEFAULT_TTL) -> Agent:
    """Validate a decoded agent JSON object into an Agent.

    ``strict`` (the admin API) also rejects unknown fields and a missing id or
    register_time is not filled in by the caller. Raises ValidationError listing
    every bad field.
    """
    if not isinstance(data, Mapping):
        raise ValidationError([FieldError("", data, "agent must be a JSON object")])
    f = _Fields()
    if strict:
        for unknown in sorted(set(data) - _AGENT_FIELDS):
            f.bad(unknown, data[unknown], "unknown field")
    name = f.string(data, "name")
    if not name.strip():
        f.bad("name", data.get("name"), "must not be empty")
    elif "/" in name or len(label(name)) > MAX_LABEL:
        f.bad("name", name, "must be at most 63 characters and contain no '/'")
    agent_id = f.string(data, "id")
    if not agent_id:
        f.bad("id", data.get("id"), "must not be empty")
    elif "/" in agent_id or len(label(agent_id)) > MAX_LABEL:
        f.bad("id", agent_id, "must be at most 63 characters and contain no '/'")
    address = f.string(data, "address")
    if not address:
        f.bad("address", data.get("address"), "must not be empty")
    elif not _valid_address(address):
        f.bad("address", address, "must be an IPv4/IPv6 address or a host name")
    port = data.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        f.bad("port", port, "must be an integer from 1 to 65535")
        port = 0
    capabilities = f.strings(data, "capabilities")
    for cap in capabilities:
        if not cap.strip() or len(label(cap)) > MAX_LABEL:
            f.bad("capabilities", cap, "must be 1 to 63 characters (a DNS label)")
        elif label(cap) in ("service", "id"):
            f.bad("capabilities", cap, "'service' and 'id' are reserved DNS labels")
    tags = f.strings(data, "tags")
    for tag in tags:
        if not tag.strip() or len(label(tag)) > MAX_LABEL:
            f.bad("tags", tag, "must be 1 to 63 characters (a DNS label)")
    metadata: dict[str, str] = {}
    raw_meta = data.get("metadata")
    if raw_meta is not None:
        if not isinstance(raw_meta, Mapping):
            f.bad("metadata", raw_meta, "must be an object of strings")
        else:
            for k, v in raw_meta.items():
                if isinstance(v, str):
                    metadata[str(k)] = v
                elif not strict and isinstance(v, (int, float, bool)):
                    metadata[str(k)] = json.dumps(v)
                else:
                    f.bad(f"metadata.{k}", v, "must be a string")
    health = _parse_health(data.get("health"), f, strict)
    register_time = f.string(data, "register_time")
    if register_time:
        try:
            parse_rfc3339(register_time)
        except ValueError:
            f.bad("register_time", register_time, "must be an RFC 3339 timestamp")
    ttl = f.duration(data, "ttl", default_ttl)
    if data.get("ttl") not in (None, 0, "0") and ttl < MIN_TTL:
        f.bad("ttl", data.get("ttl"), f"must be at least {MIN_TTL:g}s")
    if ttl == 0:
        ttl = default_ttl
    weight = data.get("weight")
    if weight is None:
        weight = DEFAULT_WEIGHT
    elif isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 65535:
        f.bad("weight", weight, "must be an integer from 0 to 65535")
        weight = DEFAULT_WEIGHT
    version = f.string(data, "version")
    protocol = f.string(data, "protocol", "http") or "http"
    zone = f.string(data, "zone")
    if f.errors:
        raise ValidationError(f.errors)
    return Agent(
        id=agent_id, name=name, address=address, port=port, version=version, protocol=protocol,
        tags=tags, metadata=metadata, health=health, capabilities=capabilities,
        register_time=register_time, ttl=ttl, weight=weight, zone=zone,
    )


@functools.lru_cache(maxsize=4096)
def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(sys.intern(v) for v in values))


def _parse_health(raw: object, f: _Fields, strict: bool) -> Health:
    if raw is None:
        return Health()
    if not isinstance(raw, Mapping):
        f.bad("health", raw, "must be an object")
        return Health()
    if strict:
        for unknown in sorted(set(raw) - _HEALTH_FIELDS):
            f.bad(f"health.{unknown}", raw[unknown], "unknown field")
    kind = f.string(raw, "type", path="health.")
    if kind not in CHECK_TYPES:
        f.bad("health.type", kind, "must be one of http, tcp, grpc")
    status = f.string(raw, "status", UNKNOWN, path="health.") or UNKNOWN
    if status not in STATUSES:
        f.bad("health.status", status, "must be one of healthy, unhealthy, unknown")
    return Health(
        type=kind,
        url=f.string(raw, "url", path="health."),
        interval=f.duration(raw, "interval", 0.0, path="health."),
        timeout=f.duration(raw, "timeout", 0.0, path="health."),
        status=status,
    )


def _valid_address(address: str) -> bool:
    return parse_ip(address) is not None or bool(_HOSTNAME.match(address))


def decode_agent(raw: bytes) -> Agent:
    """Decode an agent value read from etcd (lenient: unknown fields ignored).

    Raises ValidationError (or ValueError for bad JSON) for a value to skip.
    """
    return parse_agent(json.loads(raw))


def new_agent_id(name: str) -> str:
    """A fresh id for an agent registered without one."""
    return f"{label(name)[:50]}-{uuid.uuid4().hex[:12]}"
