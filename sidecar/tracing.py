"""OpenTelemetry tracing of proxied requests: spans exported over OTLP/HTTP.

Off unless ``tracing.otlp_endpoint`` is set (then ``Tracing.build`` returns None and the
proxy makes no tracing call at all). Sampling is parent-based: a request whose
``traceparent`` is sampled is traced, one whose ``traceparent`` is not is not, and a
request without one starts a trace with probability ``sample_ratio``. The proxy
decides that before it creates any span, so unsampled requests cost a flag check.
This is the only module that imports opentelemetry.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from .config import TracingSettings

AttributeValue = str | bool | int | float


class Span:
    """One started span; ``end`` sets the final attributes and finishes it."""

    __slots__ = ("_span",)

    def __init__(self, span: Any) -> None:
        self._span = span

    @property
    def traceparent(self) -> bytes:
        """The W3C ``traceparent`` naming this span as the parent (sampled)."""
        ctx = self._span.get_span_context()
        return b"00-%032x-%016x-01" % (ctx.trace_id, ctx.span_id)

    @property
    def trace_id(self) -> str:
        return f"{self._span.get_span_context().trace_id:032x}"

    def end(self, attributes: Mapping[str, AttributeValue], error: str = "") -> None:
        """Set ``attributes`` (and an error status when ``error`` is given) and end the span."""
        from opentelemetry.trace import Status, StatusCode

        span = self._span
        span.set_attributes(dict(attributes))
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


class Tracing:
    """A tracer provider with a batching OTLP/HTTP exporter, and the sampling rule."""

    def __init__(self, settings: TracingSettings) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

        self.settings = settings
        self.ratio = settings.sample_ratio
        # Roots are sampled here (``root_sampled``) before any span exists; the SDK then
        # follows the parent, and records every root it is asked to start.
        self.provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}),
                                       sampler=ParentBased(ALWAYS_ON))
        import requests

        session = requests.Session()
        session.trust_env = False  # the collector is reached directly, never through an HTTP_PROXY of the environment
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, timeout=settings.export_timeout, session=session)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        self.tracer = self.provider.get_tracer("sidecar.proxy")
        self._random = random.random

    @classmethod
    def build(cls, settings: TracingSettings) -> Tracing | None:
        """A Tracing when ``settings.otlp_endpoint`` is set, else None (tracing off)."""
        return cls(settings) if settings.otlp_endpoint else None

    def root_sampled(self) -> bool:
        """Whether a request that starts a new trace is traced (probability ``sample_ratio``)."""
        return self._random() < self.ratio

    def server_span(self, name: str, parent: bytes, attributes: Mapping[str, AttributeValue]) -> Span:
        """Start the SERVER span of a request, child of the client's ``traceparent`` (b"" for a root)."""
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        context = extract({"traceparent": parent.decode("latin-1")}) if parent else None
        return Span(self.tracer.start_span(name, context=context, kind=SpanKind.SERVER,
                                           attributes=dict(attributes)))

    def client_span(self, name: str, parent: Span, attributes: Mapping[str, AttributeValue]) -> Span:
        """Start a CLIENT span (one upstream attempt) under the request's SERVER span."""
        from opentelemetry.trace import SpanKind, set_span_in_context

        return Span(self.tracer.start_span(name, context=set_span_in_context(parent._span), kind=SpanKind.CLIENT,
                                           attributes=dict(attributes)))

    def shutdown(self) -> None:
        """Export what is queued (bounded by ``export_timeout``) and stop the exporter thread."""
        self.provider.shutdown()


def sampled_parent(traceparent: bytes) -> bool:
    """Whether a valid W3C ``traceparent`` has its sampled flag set."""
    return len(traceparent) == 55 and int(traceparent[53:55], 16) & 1 == 1
