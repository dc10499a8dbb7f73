"""The admin API (aiohttp): health, readiness, metrics, agents, watch."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from aiohttp import web

from .catalog import Catalog, Delete, Event, Reset, Snapshot, Upsert
from .config import AdminSettings, RegistrySettings
from .errors import RegistryUnavailable, ValidationError
from .metrics import Metrics
from .model import Agent, label, new_agent_id, parse_agent
from .registry.etcd import EtcdClient
from .registry.lease import LeaseKeeper
from .registry.sync import CatalogSync

log = logging.getLogger(__name__)

AgentAnnotator = Callable[[Agent], Mapping[str, Any]]


class Readiness(Protocol):
    def __call__(self) -> dict[str, Any]:
        """Readiness detail; ``ready`` says whether to answer 200."""
        ...


def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) into a (host, port) pair."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    body = {"error": message, "code": code, **extra}
    return web.json_response(body, status=status, headers={"x-sidecar-error": code})


class AdminApi:
    """HTTP control and query surface of one sidecar."""

    def __init__(self, settings: AdminSettings, registry_settings: RegistrySettings, catalog: Catalog,
                 sync: CatalogSync, leases: LeaseKeeper, etcd: EtcdClient, metrics: Metrics,
                 readiness: Readiness) -> None:
        self.settings = settings
        self._registry_settings = registry_settings
        self._catalog = catalog
        self._sync = sync
        self._leases = leases
        self._etcd = etcd
        self._metrics = metrics
        self._readiness = readiness
        # Extra per-agent fields for /v1/agents (e.g. the proxy's breaker state).
        self.annotators: list[AgentAnnotator] = []
        # Called before /metrics renders (components that count cheaply fold their counters in).
        self.before_scrape: list[Callable[[], None]] = []
        self.app = web.Application(middlewares=[self._auth])
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/v1/agents", self.list_agents)
        self.app.router.add_post("/v1/agents", self.create_agent)
        self.app.router.add_get("/v1/agents/{id}", self.get_agent)
        self.app.router.add_delete("/v1/agents/{id}", self.delete_agent)
        self.app.router.add_get("/v1/watch", self.watch)
        self._runner: web.AppRunner | None = None
        self._watchers: set[asyncio.Queue[Any]] = set()
        self.address: tuple[str, int] | None = None

    def add_routes(self, routes: Sequence[web.RouteDef]) -> None:
        """Let another surface (dynamic config) mount its routes before start."""
        self.app.router.add_routes(routes)

    async def start(self) -> None:
        self._catalog.subscribe(self._on_snapshot)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = parse_listen(self.settings.listen)
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.address = sockets[0].getsockname()[:2] if sockets else (host, port)
        log.info("admin API on http://%s:%d", *self.address)

    async def stop(self) -> None:
        for queue in list(self._watchers):
            queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _auth(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        token = self.settings.token
        if token and request.method not in ("GET", "HEAD", "OPTIONS"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "unauthorized", "this call needs Authorization: Bearer <admin token>")
        return await handler(request)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        detail = self._readiness()
        return web.json_response(detail, status=200 if detail.get("ready") else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        for hook in self.before_scrape:
            hook()
        body = self._metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def _agent_json(self, key: str, agent: Agent) -> dict[str, Any]:
        body = agent.to_json()
        body["key"] = key
        body["owned"] = key in self._leases.registrations
        for annotate in self.annotators:
            body.update(annotate(agent))
        return body

    async def list_agents(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        query = request.query
        healthy_arg = query.get("healthy")
        healthy: bool | None = None
        if healthy_arg is not None:
            if healthy_arg.lower() not in ("true", "false", "1", "0"):
                return _error(400, "bad_query", "healthy must be true or false", value=healthy_arg)
            healthy = healthy_arg.lower() in ("true", "1")
        tags = [label(t) for value in query.getall("tag", []) for t in value.split(",") if t]
        snapshot = self._catalog.snapshot
        agents = snapshot.select(
            capability=label(query["capability"]) if query.get("capability") else None,
            tags=tags, name=label(query["name"]) if query.get("name") else None, healthy=healthy)
        prefix = self._leases.prefix
        body = {"revision": snapshot.revision, "agents": [self._agent_json(a.key(prefix), a) for a in agents]}
        self._metrics.registry.discovery_seconds.observe(time.perf_counter() - started)
        return web.json_response(body)

    async def get_agent(self, request: web.Request) -> web.Response:
        found = self._catalog.snapshot.by_id.get(label(request.match_info["id"]), ())
        if not found:
            return _error(404, "not_found", "no agent with this id", id=request.match_info["id"])
        agent = found[0]
        return web.json_response(self._agent_json(agent.key(self._leases.prefix), agent))

    async def create_agent(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, "bad_json", f"body is not JSON: {exc}")
        if isinstance(data, dict) and not data.get("id") and isinstance(data.get("name"), str):
            data = {**data, "id": new_agent_id(data["name"])}
        try:
            agent = parse_agent(data, strict=True, default_ttl=self._registry_settings.default_ttl)
        except ValidationError as exc:
            return _error(400, "invalid_agent", "the agent does not validate",
                          fields=[e.as_dict() for e in exc.errors])
        if not agent.capabilities:
            log.info("agent %s registered without capabilities: only <name>.service and <id>.id find it", agent.id)
        if "ttl" not in data:
            agent = replace(agent, ttl=self._registry_settings.default_ttl)
        try:
            registration = await self._leases.register(agent)
        except RegistryUnavailable as exc:
            return _error(503, "etcd_unavailable", str(exc))
        return web.json_response(self._agent_json(registration.key, registration.agent), status=201)

    async def delete_agent(self, request: web.Request) -> web.Response:
        agent_id = request.match_info["id"]
        registration = self._leases.find(agent_id)
        try:
            if registration is not None:
                await registration.close()
                return web.Response(status=204)
            found = [k for k, a in self._catalog.snapshot.agents.items() if a.id == agent_id]
            if not found:
                return _error(404, "not_found", "no agent with this id", id=agent_id)
            for key in found:
                await self._etcd.delete(key)
        except RegistryUnavailable as exc:
            return _error(503, "etcd_unavailable", str(exc))
        return web.Response(status=204)

    def _on_snapshot(self, snapshot: Snapshot, events: Sequence[Event]) -> None:
        if not self._watchers:
            return
        for queue in list(self._watchers):
            queue.put_nowait((snapshot, events))

    async def watch(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one ``snapshot`` event, then ``upsert``/``delete`` per change."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=10000)
        self._watchers.add(queue)
        try:
            snapshot = self._catalog.snapshot
            await response.write(_sse("snapshot", snapshot.revision, {
                "revision": snapshot.revision,
                "agents": [self._agent_json(k, a) for k, a in snapshot.agents.items()],
            }))
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), 15.0)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if item is None:
                    break
                snapshot, events = item
                for event in events:
                    await response.write(self._event_bytes(snapshot, event))
        except ConnectionResetError:
            pass
        finally:
            self._watchers.discard(queue)
        return response

    def _event_bytes(self, snapshot: Snapshot, event: Event) -> bytes:
        if isinstance(event, Upsert):
            return _sse("upsert", event.revision, {"revision": event.revision, "key": event.key,
                                                   "agent": self._agent_json(event.key, event.agent)})
        if isinstance(event, Delete):
            return _sse("delete", event.revision, {"revision": event.revision, "key": event.key})
        assert isinstance(event, Reset)
        return _sse("snapshot", event.revision, {
            "revision": event.revision, "agents": [self._agent_json(k, a) for k, a in snapshot.agents.items()]})


def _sse(kind: str, revision: int, data: Mapping[str, Any]) -> bytes:
    return f"id: {revision}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
