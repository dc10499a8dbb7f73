"""The gRPC API (grpc.aio): ``sidecar.v1.Discovery``, ``grpc.health.v1.Health`` and server reflection.

The REST twin is ``admin.py``: both answer from the same catalog snapshot and
watch hub, and register through the same ``Control`` (same validation, same
admin token). Typed errors become gRPC status codes in one place, ``_call``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .cards import CardIndex
from .catalog import Catalog, Snapshot
from .config import AdminSettings, GrpcSettings, HostPort
from .control import Control
from .discovery import Kind, Query, Subscription, Update, WatchHub
from .errors import AgentExists, FieldError, RegistryUnavailable, ValidationError
from .grpc_gen import discovery_pb2 as pb
from .grpc_gen import discovery_pb2_grpc as pb_grpc
from .metrics import Metrics
from .model import Agent, to_nanoseconds

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE = pb.DESCRIPTOR.services_by_name["Discovery"].full_name
# In-flight unary calls get this long to finish on stop; watch streams are ended at once.
_STOP_GRACE = 2.0
_EVENT_TYPES = {Kind.SNAPSHOT: pb.WatchEvent.SNAPSHOT, Kind.UPSERT: pb.WatchEvent.UPSERT,
                Kind.DELETE: pb.WatchEvent.DELETE, Kind.RELIST: pb.WatchEvent.RELIST}


class _Status(Exception):
    """A call's answer other than OK (raised by the handlers, turned into a status by ``_call``)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(field: str, value: object, reason: str) -> _Status:
    return _Status(grpc.StatusCode.INVALID_ARGUMENT, str(FieldError(field, value, reason)))


def agent_message(agent: Agent) -> pb.Agent:
    """The protobuf twin of the agent JSON (durations as integer nanoseconds)."""
    health = agent.health
    return pb.Agent(
        id=agent.id, name=agent.name, version=agent.version, address=agent.address, port=agent.port,
        protocol=agent.protocol, tags=agent.tags, metadata=agent.metadata,
        health=pb.Health(type=health.type, url=health.url, interval=to_nanoseconds(health.interval),
                         timeout=to_nanoseconds(health.timeout), status=health.status),
        capabilities=agent.capabilities, register_time=agent.register_time, ttl=to_nanoseconds(agent.ttl),
        weight=agent.weight, zone=agent.zone)


def agent_body(message: pb.Agent) -> dict[str, Any]:
    """The agent JSON a message stands for; proto3's empty values are left out, so the JSON defaults apply."""
    body: dict[str, Any] = {"name": message.name, "address": message.address, "port": message.port,
                            "tags": list(message.tags), "metadata": dict(message.metadata),
                            "capabilities": list(message.capabilities)}
    for name in ("id", "version", "protocol", "register_time", "zone"):
        if value := getattr(message, name):
            body[name] = value
    if message.ttl:
        body["ttl"] = message.ttl
    if message.HasField("weight"):
        body["weight"] = message.weight
    if message.HasField("health"):
        health = message.health
        body["health"] = {"type": health.type, "url": health.url, "interval": health.interval,
                          "timeout": health.timeout}
        if health.status:
            body["health"]["status"] = health.status
    return body


def event_message(update: Update) -> pb.WatchEvent:
    """One watch update as a WatchEvent."""
    return pb.WatchEvent(type=_EVENT_TYPES[update.kind], revision=update.revision,
                         agents=[agent_message(agent) for _, agent in update.agents])


class GrpcApi(pb_grpc.DiscoveryServicer):
    """The gRPC query and control surface of one sidecar (``start``/``stop`` like every component)."""

    def __init__(self, settings: GrpcSettings, admin: AdminSettings, catalog: Catalog, hub: WatchHub,
                 control: Control, metrics: Metrics, cards: CardIndex | None = None) -> None:
        self.settings = settings
        self._cards = cards or CardIndex()
        self._token = admin.token
        self._catalog = catalog
        self._hub = hub
        self._control = control
        self._calls = metrics.discovery.grpc_requests
        self._discovery_seconds = metrics.registry.discovery_seconds
        self._health = grpc_health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._streams: set[Subscription] = set()
        self._unsubscribe = lambda: None
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving = False
        self._stopping = False
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        host, port = HostPort.parse(self.settings.listen, "grpc.listen")
        # grpc turns SO_REUSEPORT on by default: a second sidecar on the same port would then
        # share it silently instead of failing to start.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_DiscoveryServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
        try:
            bound = server.add_insecure_port(str(HostPort(host, port)))
        except RuntimeError as exc:
            raise OSError(f"gRPC API: cannot listen on {self.settings.listen}: {exc}") from exc
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        self.address = (host, bound)
        self._unsubscribe = self._catalog.subscribe(self._on_snapshot)
        if self._catalog.synced and not self._serving:
            self._serving = True
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC API on %s", HostPort(host, bound))

    def update(self, admin: AdminSettings) -> None:
        """Hot-apply the admin token (the listener needs a restart)."""
        self._token = admin.token

    async def stop(self) -> None:
        self._stopping = True
        self._unsubscribe()
        await self._health.enter_graceful_shutdown()
        for subscription in list(self._streams):
            subscription.close()
        if self._server is not None:
            await self._server.stop(_STOP_GRACE)
            self._server = None
        for task in list(self._tasks):
            task.cancel()

    def _on_snapshot(self, snapshot: Snapshot, events: object) -> None:
        if self._serving or not self._catalog.synced:
            return
        self._serving = True
        task = asyncio.get_running_loop().create_task(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE):
            await self._health.set(service, status)

    async def _call(self, method: str, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
        """Runs one call: counts it by method and status code, and turns typed errors into a gRPC status."""
        code = grpc.StatusCode.OK
        try:
            return await work
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except _Status as exc:
            code, message = exc.code, exc.message
        except ValidationError as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, f"the agent does not validate: {exc}"
        except AgentExists as exc:
            code, message = grpc.StatusCode.ALREADY_EXISTS, str(exc)
        except RegistryUnavailable as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, f"etcd is unavailable: {exc}"
        except Exception:
            log.exception("gRPC %s failed", method)
            code, message = grpc.StatusCode.INTERNAL, "internal error (see the sidecar's log)"
        finally:
            self._calls.labels(method, code.name).inc()
        await context.abort(code, message)
        raise AssertionError("context.abort raises")

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        token = self._token
        if not token:
            return
        metadata: Mapping[str, str | bytes] = dict(context.invocation_metadata() or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        if not hmac.compare_digest(given_bytes, f"Bearer {token}".encode()):
            raise _Status(grpc.StatusCode.UNAUTHENTICATED,
                          "this call needs metadata authorization: Bearer <admin token>")

    # The servicer methods (names fixed by the generated base class).

    async def Discover(self, request: pb.DiscoverRequest, context: grpc.aio.ServicerContext) -> pb.DiscoverResponse:
        return await self._call("Discover", context, self._discover(request))

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> None:
        await self._call("Watch", context, self._watch(request, context))

    async def Register(self, request: pb.Agent, context: grpc.aio.ServicerContext) -> pb.Agent:
        return await self._call("Register", context, self._register(request, context))

    async def Deregister(self, request: pb.DeregisterRequest,
                         context: grpc.aio.ServicerContext) -> pb.DeregisterResponse:
        return await self._call("Deregister", context, self._deregister(request, context))

    async def _discover(self, request: pb.DiscoverRequest) -> pb.DiscoverResponse:
        started = time.perf_counter()
        query = Query.of(request.capability, request.tags, request.name, request.id,
                         True if request.healthy_only else None)
        snapshot = self._catalog.snapshot
        selected = query.select(snapshot)
        response = pb.DiscoverResponse(revision=snapshot.revision, agents=[agent_message(a) for a in selected])
        if request.include_cards:
            for agent in selected:
                stored = self._cards.of(agent.name, agent.id)
                if stored is not None:
                    response.cards.append(pb.AgentCard(agent_id=agent.id, name=agent.name, revision=stored.revision,
                                                       card_json=stored.card.raw.decode(errors="replace")))
        self._discovery_seconds.observe(time.perf_counter() - started)
        return response

    async def _watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> None:
        if request.from_revision < 0:
            raise _invalid("from_revision", request.from_revision, "must be a revision (0: start with a SNAPSHOT)")
        query = Query.of(request.capability, request.tags, request.name)
        subscription = await self._hub.subscribe(query, request.from_revision or None)
        self._streams.add(subscription)
        try:
            if self._stopping:
                return
            while batch := await subscription.next_batch():
                for update in batch:
                    await context.write(event_message(update))
        finally:
            subscription.close()
            self._streams.discard(subscription)

    async def _register(self, request: pb.Agent, context: grpc.aio.ServicerContext) -> pb.Agent:
        self._authorize(context)
        registration = await self._control.register(agent_body(request))
        answer = agent_message(registration.agent)
        # etcd unreachable: kept by this sidecar and written as soon as etcd answers (REST: 202).
        answer.pending = registration.pending
        return answer

    async def _deregister(self, request: pb.DeregisterRequest,
                          context: grpc.aio.ServicerContext) -> pb.DeregisterResponse:
        self._authorize(context)
        if not request.id:
            raise _invalid("id", request.id, "must not be empty")
        if not await self._control.deregister(request.id):
            raise _Status(grpc.StatusCode.NOT_FOUND, f"no agent with id {request.id!r}")
        return pb.DeregisterResponse()
