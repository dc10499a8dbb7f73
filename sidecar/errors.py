"""The typed error tree; responses are made from these in one place per surface."""

from __future__ import annotations

import json


class SidecarError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SidecarError):
    """A setting that does not validate; names the key and the offending value."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f"{key}: {reason} (got {value!r})")

    def as_dict(self) -> dict[str, object]:
        """``key``, ``value`` (as JSON can carry it) and ``reason``, for API answers."""
        return {"key": self.key, "value": _jsonable(self.value), "reason": self.reason}


class ConfigConflict(SidecarError):
    """A configuration write lost a compare-and-swap: someone else wrote a newer version first."""

    def __init__(self, expected: int, current: int) -> None:
        self.expected = expected
        self.current = current
        super().__init__(f"the configuration changed since version {expected} (now version {current}); "
                         "read it again and retry")


class FieldError(SidecarError):
    """One bad field of an agent record."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {reason} (got {value!r})")

    def as_dict(self) -> dict[str, object]:
        return {"field": self.field, "value": _jsonable(self.value), "error": self.reason}


class ValidationError(SidecarError):
    """An agent record with one or more bad fields."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


class RegistryError(SidecarError):
    """The registry backend (etcd) failed."""


class RegistryUnavailable(RegistryError):
    """etcd could not be reached or did not answer in time."""


class RegistryBusy(RegistryUnavailable):
    """etcd is shedding load ("too many requests"); retried with backoff before surfacing."""


class LeaseNotFound(RegistryError):
    """The lease is gone (expired or revoked); the keys attached to it are gone too."""


class AgentExists(RegistryError):
    """Another owner (another lease) holds this agent id; it is not taken over."""

    def __init__(self, key: str, lease: int) -> None:
        self.key = key
        self.lease = lease
        super().__init__(f"{key} is registered by another owner (lease {lease:x}); deregister it first or "
                         "wait for its lease to expire")


class RevisionCompacted(RegistryError):
    """A watch asked for a revision etcd has compacted away; relist."""

    def __init__(self, compact_revision: int) -> None:
        self.compact_revision = compact_revision
        super().__init__(f"revision compacted up to {compact_revision}")


def _jsonable(value: object) -> object:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


class ProxyError(SidecarError):
    """A request the HTTP proxy could not route or relay; ``target`` is the requested host."""

    agent_id: str = ""  # the agent that failed, when there was one

    def __init__(self, target: str = "", detail: str = "") -> None:
        self.target = target
        self.detail = detail
        super().__init__(detail or type(self).__name__)


class TaskOwnerUnavailable(ProxyError):
    """An A2A call names a task or context whose agent is gone or not servable; no other agent knows it."""


class BadRequest(ProxyError):
    """The client sent a request that is not valid HTTP/1 (bad request line, smuggling)."""


class HeadersTooLarge(ProxyError):
    """The request line and headers exceed ``proxy.max_header_bytes``."""


class UnknownTarget(ProxyError):
    """An in-zone host that names no capability, service, id or tag."""


class PassthroughDisabled(ProxyError):
    """A host outside the zone while ``proxy.passthrough`` is off."""


class NoHealthyAgent(ProxyError):
    """The target exists but none of its agents is healthy."""


class CircuitOpen(ProxyError):
    """Every healthy agent of the target has its breaker open."""


class Overloaded(ProxyError):
    """A concurrency limit or the rate limit refused the request."""

    def __init__(self, target: str = "", detail: str = "", retry_after: float = 0.0,
                 rate_limited: bool = False) -> None:
        super().__init__(target, detail)
        self.retry_after = retry_after
        self.rate_limited = rate_limited


class UpstreamError(ProxyError):
    """The agent (or passthrough host) refused, reset or answered garbage."""


class UpstreamTimeout(ProxyError):
    """The agent did not connect or answer within the per-phase timeout."""


class CardError(SidecarError):
    """An A2A agent card that cannot be read or does not have the expected shape; names the source."""

    def __init__(self, source: str, reason: str, *, kind: str = "invalid") -> None:
        self.source = source
        self.reason = reason
        # "missing" (404, no file), "unreachable" (cannot fetch), "too_large" or "invalid"
        self.kind = kind
        super().__init__(f"A2A agent card {source}: {reason}")

    @property
    def missing(self) -> bool:
        return self.kind == "missing"
