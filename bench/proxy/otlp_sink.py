"""An OTLP/HTTP trace receiver for the benchmark: accepts every export, counts the spans.

    python bench/proxy/otlp_sink.py --port 4318     # POST /v1/traces
"""

from __future__ import annotations

import argparse

from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    spans = 0
    ok = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()

    async def export(request: web.Request) -> web.Response:
        nonlocal spans
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        spans += sum(len(s.spans) for r in message.resource_spans for s in r.scope_spans)
        return web.Response(body=ok, content_type="application/x-protobuf")

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"spans": spans})

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    app.router.add_get("/spans", count)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
