"""What the proxy tells about each request beyond metrics: the access log line and the
trace spans. Only requests with a ``Trace`` record (access log on, or tracing on) reach
this module; with both off the relay makes no call here.
"""

from __future__ import annotations

import json
import logging
import time

from ..tracing import AttributeValue, Span, Tracing, sampled_parent

access_log = logging.getLogger("sidecar.access")


class Trace:
    """One request's facts as it is served: filled in by the relay, told in ``finish``."""

    __slots__ = ("agent_id", "attempt_span", "attempts", "capability", "host", "kind", "method", "outcome", "path",
                 "peer", "sent", "span", "started", "status", "trace_id", "wall")

    def __init__(self, method: bytes, peer: bytes, started: float) -> None:
        self.method = method.decode("latin-1")
        self.peer = peer.decode("latin-1")
        self.started = started
        self.wall = time.time()
        self.host = ""
        self.path = ""
        self.kind = "bad"
        self.capability = ""
        self.status = 0
        self.outcome = ""
        self.agent_id = ""
        self.attempts = 0
        self.trace_id = ""
        self.sent = b""  # the traceparent in the upstream head
        self.span: Span | None = None
        self.attempt_span: Span | None = None

    def target(self, kind: str, host: str, path: bytes, capability: str) -> None:
        """The routed target of the request."""
        self.kind, self.host, self.path, self.capability = kind, host, path.decode("latin-1"), capability

    def start_span(self, tracing: Tracing | None, traceparent: bytes, from_client: bool, sampled: bool) -> None:
        """Note the trace context sent upstream; start the SERVER span when the request is sampled."""
        self.trace_id = traceparent[3:35].decode("latin-1")
        self.sent = traceparent
        if tracing is None or not (sampled_parent(traceparent) if from_client else sampled):
            return
        self.span = tracing.server_span(self.method, traceparent if from_client else b"", {
            "http.request.method": self.method, "url.path": self.path, "server.address": self.host,
            "client.address": self.peer, "sidecar.target.kind": self.kind, "sidecar.capability": self.capability})
        self.trace_id = self.span.trace_id

    def start_attempt(self, tracing: Tracing | None, head: bytes, agent_id: str, address: str, port: int,
                      trial: bool) -> bytes:
        """Count an upstream attempt; when traced, start its CLIENT span and return ``head`` naming it as parent."""
        self.attempts += 1
        if tracing is None or self.span is None:
            return head
        self.attempt_span = span = tracing.client_span(self.method, self.span, {
            "http.request.method": self.method, "server.address": address, "server.port": port,
            "sidecar.agent.id": agent_id, "sidecar.capability": self.capability, "sidecar.attempt": self.attempts,
            "sidecar.breaker.trial": trial})
        sent, self.sent = self.sent, span.traceparent
        return head.replace(b"\r\ntraceparent: " + sent, b"\r\ntraceparent: " + self.sent, 1)

    def end_attempt(self, outcome: str, status: int, retried: bool) -> None:
        """End the attempt's CLIENT span: its outcome kind, status, and whether another attempt follows."""
        span, self.attempt_span = self.attempt_span, None
        if span is None:
            return
        attributes: dict[str, AttributeValue] = {"sidecar.outcome": outcome, "sidecar.retried": retried}
        if status:
            attributes["http.response.status_code"] = status
        span.end(attributes, "" if outcome in ("success", "backpressure") else outcome)

    def answered(self, status: int, outcome: str, agent_id: str) -> None:
        """The response the client gets: status, ``ok`` or an error code, and the agent."""
        self.status, self.outcome, self.agent_id = status, outcome, agent_id

    def finish(self, now: float, body: bytes | None, log_it: bool) -> None:
        """The request is over: end the SERVER span and write the access log line."""
        if self.attempt_span is not None:  # the client went away mid-attempt
            self.end_attempt("client_gone", 0, False)
        if self.span is not None:
            attributes: dict[str, AttributeValue] = {
                "http.response.status_code": self.status, "sidecar.outcome": self.outcome or "client_gone",
                "sidecar.agent.id": self.agent_id, "sidecar.attempts": self.attempts}
            attributes.update(a2a_attributes(body))
            self.span.end(attributes, "" if self.outcome == "ok" else self.outcome or "client_gone")
            self.span = None
        if log_it:
            duration = round((now - self.started) * 1000, 3)
            access_log.info("%s %s%s %d %s %.3fms", self.method, self.host, self.path, self.status,
                            self.agent_id or "-", duration, extra={
                                "method": self.method, "host": self.host, "path": self.path, "status": self.status,
                                "outcome": self.outcome or "client_gone", "target_kind": self.kind,
                                "agent_id": self.agent_id, "attempts": self.attempts, "duration_ms": duration,
                                "client": self.peer, "trace_id": self.trace_id,
                                "start_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.wall))
                                + f".{int(self.wall % 1 * 1000):03d}Z"})


def a2a_attributes(body: bytes | None) -> dict[str, AttributeValue]:
    """``rpc.system``, ``a2a.method`` and ``gen_ai.operation.name`` when ``body`` is an A2A JSON-RPC call."""
    if not body or body[:1] != b"{":
        return {}
    try:
        message = json.loads(body)
    except ValueError:
        return {}
    method = message.get("method") if isinstance(message, dict) and message.get("jsonrpc") == "2.0" else None
    if not isinstance(method, str):
        return {}
    attributes: dict[str, AttributeValue] = {"rpc.system": "jsonrpc", "rpc.method": method, "a2a.method": method}
    if method.startswith("message/"):
        attributes["gen_ai.operation.name"] = "invoke_agent"
    return attributes
