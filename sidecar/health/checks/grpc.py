"""``grpc``: ``grpc.health.v1.Health/Check``; SERVING is healthy, anything else unhealthy.

The target is ``host:port`` or ``grpc://host:port/<service>`` to ask about one
service instead of the whole server.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import Result, host_port


class Grpc:
    def __init__(self, url: str, timeout: float) -> None:
        host, port, self.service = host_port(url)
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    async def check(self) -> Result:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target)
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=self.service), timeout=self.timeout,
                                     wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            return Result(False, detail=f"{exc.code().name}: {exc.details()}")
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return Result(reply.status == health_pb2.HealthCheckResponse.SERVING, detail=status)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
