"""Map a request's host to a routing target (pure: no sockets, no snapshot).

In-zone forms: ``<cap>.<zone>``, ``<tag>.<cap>.<zone>``, ``<name>.service.<zone>``,
``<id>.id.<zone>``. Any other host is ``external`` (passthrough).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..catalog import Snapshot
from ..errors import UnknownTarget
from ..model import Agent, label

Kind = Literal["capability", "name", "id", "external"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: a selection of agents, or an external host:port."""

    kind: Kind
    host: str
    port: int
    capability: str = ""
    tag: str = ""
    name: str = ""
    agent_id: str = ""
    # Derived once: routes are cached per Host and read on every request.
    key: str = field(init=False, compare=False, repr=False)  # per-target state (balancer, limits, sessions)
    authority: str = field(init=False, compare=False, repr=False)  # host[:port] as the agent's Host header
    authority_bytes: bytes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind == "capability":
            key = f"{self.tag}.{self.capability}" if self.tag else self.capability
        elif self.kind == "name":
            key = f"{self.name}.service"
        elif self.kind == "id":
            key = f"{self.agent_id}.id"
        else:
            key = f"{self.host}:{self.port}"
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "authority", self.host if self.port == 80 else f"{self.host}:{self.port}")
        object.__setattr__(self, "authority_bytes", self.authority.encode("latin-1"))

    def agents(self, snapshot: Snapshot) -> tuple[Agent, ...]:
        """Every agent of this target in ``snapshot``, healthy or not (empty for external)."""
        if self.kind == "capability":
            return snapshot.select(capability=self.capability, tags=(self.tag,) if self.tag else ())
        if self.kind == "name":
            return snapshot.select(name=self.name)
        if self.kind == "id":
            return snapshot.select(agent_id=self.agent_id)
        return ()


def split_host(authority: str, default_port: int = 80) -> tuple[str, int]:
    """``host[:port]`` (IPv6 in brackets) -> (lower-case host without trailing dot, port).

    Raises ValueError for an empty host or a bad port.
    """
    text = authority.strip()
    port = default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad host {authority!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad host {authority!r}")
            port = _port(rest[1:], authority)
    elif text.count(":") == 1:
        host, _, raw = text.partition(":")
        port = _port(raw, authority)
    else:
        host = text
    host = host.rstrip(".").lower()
    if not host:
        raise ValueError(f"empty host in {authority!r}")
    return host, port


def _port(raw: str, authority: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"bad port in {authority!r}")
    return int(raw)


def route(authority: str, zone: str, default_port: int = 80) -> Route:
    """The Route for a Host header / absolute-form / CONNECT authority.

    Raises UnknownTarget for an in-zone host of no known form, ValueError for a
    host that does not parse.
    """
    host, port = split_host(authority, default_port)
    zone = zone.strip(".").lower()
    suffix = "." + zone
    if host == zone:
        raise UnknownTarget(host, "the zone itself names no target")
    if not host.endswith(suffix):
        return Route("external", host, port)
    labels = host[: -len(suffix)].split(".")
    if len(labels) == 1:
        return Route("capability", host, port, capability=label(labels[0]))
    if len(labels) == 2:
        first, second = labels
        if second == "service":
            return Route("name", host, port, name=label(first))
        if second == "id":
            return Route("id", host, port, agent_id=label(first))
        return Route("capability", host, port, capability=label(second), tag=label(first))
    raise UnknownTarget(host, f"{host} is not <cap>, <tag>.<cap>, <name>.service or <id>.id in {zone}")
