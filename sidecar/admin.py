"""The admin API (aiohttp): health, readiness, metrics, agents, watch, dynamic configuration."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web

from .cards import CardIndex
from .catalog import Catalog
from .config import AdminSettings, HostPort
from .control import Control
from .discovery import SIDECAR_FIELDS, Kind, Query, Subscription, Update, WatchHub, agent_document, agents_document
from .dynamic import ConfigStore
from .errors import AgentExists, ConfigConflict, ConfigError, RegistryUnavailable, ValidationError
from .metrics import Metrics
from .model import Agent, label
from .registry.lease import LeaseKeeper, Registration

log = logging.getLogger(__name__)

AgentAnnotator = Callable[[Agent], Mapping[str, Any]]
# How long an idle SSE stream waits before a keepalive comment.
_SSE_KEEPALIVE = 15.0


class Readiness(Protocol):
    def __call__(self) -> dict[str, Any]:
        """Readiness detail; ``ready`` says whether to answer 200."""
        ...


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    body = {"error": message, "code": code, **extra}
    return web.json_response(body, status=status, headers={"x-sidecar-error": code})


def _bool_arg(value: str | None, name: str) -> bool | None:
    if value is None:
        return None
    if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(name, value, "must be true or false")
    return value.lower() in ("true", "1")


class AdminApi:
    """HTTP control and query surface of one sidecar."""

    def __init__(self, settings: AdminSettings, catalog: Catalog, hub: WatchHub, control: Control,
                 leases: LeaseKeeper, config: ConfigStore, metrics: Metrics, readiness: Readiness, *,
                 annotators: Sequence[AgentAnnotator] = (), before_scrape: Sequence[Callable[[], None]] = (),
                 cards: CardIndex | None = None) -> None:
        self.settings = settings
        self._catalog = catalog
        self._hub = hub
        self._control = control
        self._leases = leases
        self._config = config
        self._metrics = metrics
        self._readiness = readiness
        self._cards = cards or CardIndex()
        # Extra per-agent fields for /v1/agents (e.g. the proxy's breaker state).
        self._annotators = tuple(annotators)
        # Called before /metrics renders (components that count cheaply fold their counters in).
        self._before_scrape = tuple(before_scrape)
        self.app = web.Application(middlewares=[self._auth])
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/v1/agents", self.list_agents)
        self.app.router.add_post("/v1/agents", self.create_agent)
        self.app.router.add_get("/v1/agents/{id}", self.get_agent)
        self.app.router.add_delete("/v1/agents/{id}", self.delete_agent)
        self.app.router.add_get("/v1/watch", self.watch)
        self.app.router.add_get("/v1/cards", self.list_cards)
        self.app.router.add_get("/v1/config", self.get_config)
        self.app.router.add_put("/v1/config", self.put_config)
        self.app.router.add_get("/v1/config/history", self.config_history)
        self._runner: web.AppRunner | None = None
        self._streams: set[Subscription] = set()
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = HostPort.parse(self.settings.listen, "admin.listen")
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.address = sockets[0].getsockname()[:2] if sockets else (host, port)
        log.info("admin API on http://%s:%d", *self.address)

    def update(self, settings: AdminSettings) -> None:
        """Hot-apply the token (the listener needs a restart)."""
        self.settings = settings

    async def stop(self) -> None:
        for subscription in list(self._streams):
            subscription.close()
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
        for hook in self._before_scrape:
            hook()
        body = self._metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def _annotate(self, key: str, agent: Agent) -> dict[str, Any]:
        extra: dict[str, Any] = {**SIDECAR_FIELDS, "owned": key in self._leases.registrations}
        for annotate in self._annotators:
            extra.update(annotate(agent))
        return extra

    def _agent_json(self, key: str, agent: Agent) -> dict[str, Any]:
        return agent_document(key, agent, self._annotate)

    def _query(self, request: web.Request) -> Query:
        query = request.query
        return Query.of(query.get("capability"), query.getall("tag", []), query.get("name"), query.get("id"),
                        _bool_arg(query.get("healthy"), "healthy"))

    async def list_agents(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            query = self._query(request)
        except ConfigError as exc:
            return _error(400, "bad_query", str(exc), value=exc.value)
        # Pending: this sidecar's registrations not in etcd yet (accepted with 202 while etcd was unreachable).
        body = agents_document(self._catalog.snapshot, query, self._leases.prefix, self._annotate, [
            self._pending_json(r) for r in self._leases.pending.values() if query.matches(r.agent)])
        self._metrics.registry.discovery_seconds.observe(time.perf_counter() - started)
        return web.json_response(body)

    def _pending_json(self, registration: Registration) -> dict[str, Any]:
        return {**self._agent_json(registration.key, registration.agent), "owned": True, "state": "pending",
                "pending_seconds": round(time.monotonic() - registration.accepted, 3)}

    async def get_agent(self, request: web.Request) -> web.Response:
        found = self._catalog.snapshot.by_id.get(label(request.match_info["id"]), ())
        if not found:
            pending = [r for r in self._leases.owned(request.match_info["id"]) if r.pending]
            if pending:
                return web.json_response(self._pending_json(pending[0]))
            return _error(404, "not_found", "no agent with this id", id=request.match_info["id"])
        agent = found[0]
        return web.json_response(self._agent_json(agent.key(self._leases.prefix), agent))

    async def create_agent(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, "bad_json", f"body is not JSON: {exc}")
        try:
            registration = await self._control.register(data)
        except ValidationError as exc:
            return _error(400, "invalid_agent", "the agent does not validate",
                          fields=[e.as_dict() for e in exc.errors])
        except AgentExists as exc:
            return _error(409, "agent_exists", str(exc), key=exc.key)
        if registration.pending:
            # etcd unreachable: kept, and written by this sidecar as soon as etcd answers.
            return web.json_response(self._pending_json(registration), status=202)
        return web.json_response({**self._agent_json(registration.key, registration.agent), "state": "registered"},
                                 status=201)

    async def delete_agent(self, request: web.Request) -> web.Response:
        agent_id = request.match_info["id"]
        try:
            if not await self._control.deregister(agent_id):
                return _error(404, "not_found", "no agent with this id", id=agent_id)
        except RegistryUnavailable as exc:
            return _error(503, "etcd_unavailable", str(exc))
        return web.Response(status=204)

    async def watch(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``snapshot``, then ``upsert``/``delete`` per change; ``relist`` when a resume is gone.

        ``Last-Event-ID`` (or ``?from_revision=``) resumes after that revision; the
        event id is the etcd revision, set on the last event of each revision.
        """
        try:
            query = self._query(request)
            raw = request.headers.get("Last-Event-ID") or request.query.get("from_revision")
            from_revision = None if raw in (None, "") else int(raw)
        except ConfigError as exc:
            return _error(400, "bad_query", str(exc), value=exc.value)
        except ValueError:
            return _error(400, "bad_query", "Last-Event-ID / from_revision must be a revision number", value=raw)
        subscription = await self._hub.subscribe(query, from_revision)
        self._streams.add(subscription)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            while True:
                try:
                    batch = await asyncio.wait_for(subscription.next_batch(), _SSE_KEEPALIVE)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if not batch:
                    break
                await response.write(self._sse_batch(batch))
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            subscription.close()
            self._streams.discard(subscription)
        return response

    def _sse_batch(self, batch: Sequence[Update]) -> bytes:
        out = []
        for i, update in enumerate(batch):
            last_of_revision = i + 1 == len(batch) or batch[i + 1].revision != update.revision
            if update.kind is Kind.SNAPSHOT:
                data: dict[str, Any] = {"agents": [self._agent_json(k, a) for k, a in update.agents]}
            elif update.kind is Kind.UPSERT:
                key, agent = update.agents[0]
                data = {"key": key, "agent": self._agent_json(key, agent)}
            elif update.kind is Kind.DELETE:
                key, agent = update.agents[0]
                data = {"key": key, "id": agent.id}
            else:
                data = {}
            out.append(_sse(update.kind.value, update.revision if last_of_revision else None,
                            {"revision": update.revision, **data}))
        return b"".join(out)

    async def list_cards(self, request: web.Request) -> web.Response:
        """Every stored card of an agent in the snapshot, filtered by the agents' capability/tag and by skill."""
        try:
            query = self._query(request)
        except ConfigError as exc:
            return _error(400, "bad_query", str(exc), value=exc.value)
        skill = label(request.query["skill"]) if request.query.get("skill") else None
        cards = self._cards
        listed = []
        for agent in query.select(self._catalog.snapshot):
            stored = cards.of(agent.name, agent.id)
            if stored is None or (skill is not None and skill not in {label(s) for s in stored.card.skills}):
                continue
            listed.append({"id": agent.id, "name": agent.name, "key": stored.key, "health": agent.health.status,
                           "revision": stored.revision, "card": json.loads(stored.card.raw)})
        return web.json_response({"revision": cards.revision, "cards": listed})

    async def get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self._config.status())

    async def put_config(self, request: web.Request) -> web.Response:
        try:
            document = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, "bad_json", f"body is not JSON: {exc}")
        raw = request.headers.get("If-Match") or request.query.get("version")
        try:
            expected = None if raw in (None, "") else int(str(raw).strip('"'))
        except ValueError:
            return _error(400, "bad_query", "If-Match / version must be a config version (etcd revision)", value=raw)
        try:
            version = await self._config.put(document, expected)
        except ConfigError as exc:
            detail = exc.as_dict()
            return _error(400, "invalid_config", str(exc), key=detail["key"], value=detail["value"])
        except ConfigConflict as exc:
            return _error(409, "config_conflict", str(exc), version=exc.current)
        except RegistryUnavailable as exc:
            return _error(503, "etcd_unavailable", str(exc))
        return web.json_response({"version": version}, status=200, headers={"ETag": f'"{version}"'})

    async def config_history(self, request: web.Request) -> web.Response:
        try:
            return web.json_response({"versions": await self._config.history()})
        except RegistryUnavailable as exc:
            return _error(503, "etcd_unavailable", str(exc))


def _sse(kind: str, revision: int | None, data: Mapping[str, Any]) -> bytes:
    event_id = "" if revision is None else f"id: {revision}\n"
    return f"{event_id}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
