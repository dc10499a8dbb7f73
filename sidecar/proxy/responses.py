"""Typed proxy errors -> HTTP responses, in one place: JSON ``{"error","code","target"}``
plus ``x-sidecar-error``. Pure.
"""

from __future__ import annotations

import json

from ..errors import (
    BadRequest,
    CircuitOpen,
    HeadersTooLarge,
    NoHealthyAgent,
    Overloaded,
    PassthroughDisabled,
    ProxyError,
    TaskOwnerUnavailable,
    UnknownTarget,
    UpstreamError,
    UpstreamTimeout,
)

# (error type, status, code); the first matching row wins.
_ERRORS: tuple[tuple[type[ProxyError], int, str], ...] = (
    (BadRequest, 400, "bad_request"),
    (HeadersTooLarge, 431, "headers_too_large"),
    (UnknownTarget, 404, "unknown_target"),
    (PassthroughDisabled, 403, "passthrough_disabled"),
    (TaskOwnerUnavailable, 503, "task_owner_unavailable"),
    (NoHealthyAgent, 503, "no_healthy_agent"),
    (CircuitOpen, 503, "circuit_open"),
    (Overloaded, 503, "overloaded"),
    (UpstreamTimeout, 504, "upstream_timeout"),
    (UpstreamError, 502, "upstream_error"),
)
_REASONS = {400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 429: b"Too Many Requests",
            431: b"Request Header Fields Too Large", 502: b"Bad Gateway", 503: b"Service Unavailable",
            504: b"Gateway Timeout", 500: b"Internal Server Error"}


def error_status(err: ProxyError) -> tuple[int, str]:
    """(HTTP status, DESIGN.md error code) of a typed proxy error."""
    for kind, status, code in _ERRORS:
        if isinstance(err, kind):
            if isinstance(err, Overloaded) and err.rate_limited:
                return 429, code
            return status, code
    return 500, "internal_error"


def error_response(err: ProxyError, agent_id: str = "", keep_alive: bool = True) -> bytes:
    """The complete response for ``err``: JSON ``{"error","code","target"}`` + ``x-sidecar-error``."""
    status, code = error_status(err)
    body = json.dumps({"error": str(err), "code": code, "target": err.target}).encode()
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
             b"content-type: application/json\r\n",
             b"content-length: %d\r\n" % len(body),
             b"x-sidecar-error: " + code.encode() + b"\r\n"]
    if agent_id:
        lines.append(b"x-sidecar-agent: " + agent_id.encode() + b"\r\n")
    if isinstance(err, Overloaded) and err.retry_after > 0:
        lines.append(b"retry-after: %d\r\n" % max(1, round(err.retry_after)))
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)

