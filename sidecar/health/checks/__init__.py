"""Active health checks: one ``HealthCheck`` per type, chosen by name.

A check only reports a Result; thresholds, damping and what to do about a
change belong to the scheduler (``health.active``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Result:
    """One check's verdict: healthy or not, whether the agent said it is loaded (HTTP 429), and why."""

    healthy: bool
    loaded: bool = False
    detail: str = ""
    # The share of capacity in use the agent reported (HTTP check: an ``x-agent-load`` header), or None.
    load: float | None = None


class HealthCheck(Protocol):
    async def check(self) -> Result:
        """Probe the agent once, within the check's timeout; never raises for an unhealthy agent."""

    async def close(self) -> None:
        """Release connections or channels the check keeps between probes."""


def target(kind: str, url: str, address: str, port: int) -> str:
    """The check's target: ``url`` when given, else the agent's address and port in the form ``kind`` takes.

    http -> ``http://ADDRESS:PORT/health``; tcp and grpc -> ``ADDRESS:PORT``.
    """
    if url:
        return url
    host = f"[{address}]" if ":" in address else address
    if kind == "http":
        return f"http://{host}:{port}/health"
    return f"{host}:{port}"


def host_port(text: str) -> tuple[str, int, str]:
    """``[scheme://]host:port[/path]`` -> (host, port, path without the leading slash)."""
    parts = urlsplit(text if "://" in text else f"//{text}")
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"{text!r} is not host:port")
    return parts.hostname, parts.port, parts.path.lstrip("/")


def make(kind: str, url: str, timeout: float) -> HealthCheck:
    """The check named ``kind`` (http, tcp or grpc) aimed at ``url``; ValueError for an unknown kind or bad url."""
    if kind == "http":
        from .http import Http

        return Http(url, timeout)
    if kind == "tcp":
        from .tcp import Tcp

        return Tcp(url, timeout)
    if kind == "grpc":
        from .grpc import Grpc

        return Grpc(url, timeout)
    raise ValueError(f"unknown health check type {kind!r} (http, tcp or grpc)")
