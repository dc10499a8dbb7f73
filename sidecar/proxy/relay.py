"""The relay: the front door (target, route, errors, cards) and the two starts of a
forwarded request. What to do at each step of one is decided by the I/O-free
``Machine`` (exchange.py); ``Flight`` (flight.py) carries its actions out from the
socket callbacks, and ``fly`` here from the client connection's task, which only
waits for new connections, retries and tunnels.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from ..catalog import Catalog
from ..config import ProxySettings
from ..errors import (
    BadRequest,
    PassthroughDisabled,
    ProxyError,
    UpstreamError,
    UpstreamTimeout,
)
from ..metrics import ProxyMetrics
from ..tracing import Tracing, sampled_parent
from . import routing, tunnel
from .a2a import CARD_PATHS, A2aRouting, Call, Learner, fetch_card, read_call, rewrite_card
from .client import ClientConnection, Request
from .exchange import ANSWER, GONE, RETRY, UPGRADE, Machine
from .flight import ClientGone, Flight
from .heads import Keys, request_head, response_head
from .observe import Trace
from .policy import Policy
from .pool import Pool
from .responses import error_response, error_status
from .upstream import Exchange, Upstream

log = logging.getLogger(__name__)


class Relay:
    """Everything the connections share: settings, catalog, policy, pool, metrics."""

    def __init__(self, settings: ProxySettings, zone: str, catalog: Catalog, policy: Policy,
                 metrics: ProxyMetrics, loop: asyncio.AbstractEventLoop | None = None,
                 tracing: Tracing | None = None, a2a: A2aRouting | None = None) -> None:
        self.settings = settings
        self.tracing = tracing
        self.a2a = a2a
        # Requests get a Trace record only while something reads it: every request while the
        # access log is on, else only those traced (decided when the request head is built).
        self.access_log = settings.access_log
        self.zone = zone
        self.catalog = catalog
        self.policy = policy
        self.metrics = metrics
        self.loop = loop or asyncio.get_running_loop()
        self.pool = Pool(self)
        self.connections: set[ClientConnection] = set()
        self.exchanges: set[Exchange] = set()
        self.fast_starts = 0  # requests ``begin`` took (a diagnostic for tests and benchmarks)
        self._routes: dict[str, routing.Route] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep()

    def _sweep(self) -> None:
        self.policy.fold()  # what no success batch brought in yet (requests for the retry budget)
        now = self.loop.time()
        for exchange in list(self.exchanges):
            exchange.check(now)
        tick = min(1.0, max(0.01, self.settings.read_timeout / 10))
        self._sweeper = self.loop.call_at(now + tick, self._sweep)

    def _route(self, authority: str) -> routing.Route:
        found = self._routes.get(authority)
        if found is None:
            try:
                found = routing.route(authority, self.zone)
            except ValueError as exc:
                raise BadRequest(authority, str(exc)) from None
            if len(self._routes) >= 4096:
                self._routes.clear()
            self._routes[authority] = found
        return found

    def protocol(self) -> ClientConnection:
        """A protocol factory for ``loop.create_server``."""
        return ClientConnection(self)

    def update(self, settings: ProxySettings) -> None:
        """Swap proxy settings live (timeouts, limits, passthrough)."""
        self.settings = settings
        self.access_log = settings.access_log
        self.policy.update(proxy=settings)
        self._routes.clear()

    # Per-request counters are plain ints and dicts, read by the metrics collector at scrape time.
    def count(self, kind: str, outcome: str, capability: str = ProxyMetrics.NO_CAPABILITY) -> None:
        self.metrics.requests[(kind, capability, outcome)] += 1

    def _capability(self, request: Request, kind: str, outcome: str) -> str:
        """The ``capability`` label of a request answered with an error: its route's capability, routed again
        from the request (errors only: the answered path never pays for it); ``-`` when it names none."""
        if kind != "capability":
            return ProxyMetrics.NO_CAPABILITY
        try:
            route = self._route(self._target(request)[0])
        except ProxyError:
            return ProxyMetrics.NO_CAPABILITY
        # A capability nobody registered gets no label value of its own.
        return self.metrics.of_capability(route.capability, outcome != "unknown_target").capability

    # -- one request

    async def handle(self, client: ClientConnection, request: Request) -> bool:
        """Serve one request; False when the client connection must close afterwards."""
        kind = "bad"
        trace = request.trace
        if trace is None and self.access_log:
            trace = request.trace = Trace(request.method, client.peer, self.loop.time())
        try:
            if request.error is not None:
                raise request.error
            authority, path = self._target(request)
            if trace is not None:
                trace.target("connect" if request.method == b"CONNECT" else kind, authority, path, "")
            if request.method == b"CONNECT":
                kind = "connect"
                return await tunnel.connect(self, client, authority)
            route = self._route(authority)
            kind = route.kind
            if trace is not None:
                trace.target(kind, route.host, path, route.capability)
            if route.kind == "external":
                if not self.settings.passthrough:
                    raise PassthroughDisabled(route.host, f"{route.host} is outside {self.zone} and passthrough is off")
            elif self.a2a is not None:
                if request.method == b"GET" and path in CARD_PATHS and await self._serve_card(client, request, route,
                                                                                               path):
                    return request.keep_alive
                if request.held is not None:
                    body = await request.whole()
                    if not request.body_done:
                        raise ClientGone  # the client left before sending the whole call
                    return await self._forward(client, request, route, path, read_call(body))
            return await self._forward(client, request, route, path)
        except ProxyError as err:
            return self.answer(client, request, kind, err)
        except ClientGone:
            return False

    def answer(self, client: ClientConnection, request: Request, kind: str, err: ProxyError) -> bool:
        """Send ``err`` as the response; whether the client connection may stay open."""
        status, code = error_status(err)
        self.count(kind, code, self._capability(request, kind, code))
        if request.trace is not None:
            request.trace.answered(status, code, err.agent_id)
        keep = request.keep_alive and request.body_done and request.error is None and not request.upgrade
        client.write(error_response(err, err.agent_id, keep))
        return keep

    def _target(self, request: Request) -> tuple[str, bytes]:
        """(authority, origin-form path) from an origin-, absolute- or authority-form target."""
        url = request.url
        if request.method == b"CONNECT":
            return url.decode("latin-1"), b""
        if url.startswith(b"/") or url == b"*":
            for name, value in request.headers:
                if len(name) == 4 and name.lower() == b"host":
                    return value.decode("latin-1"), url
            raise BadRequest("", "no Host header")
        scheme, sep, rest = url.partition(b"://")
        if not sep or scheme.lower() != b"http":
            raise BadRequest(url.decode("latin-1"), "absolute-form targets must be http:// (use CONNECT for https)")
        authority, slash, path = rest.partition(b"/")
        authority = authority.rpartition(b"@")[2]
        return authority.decode("latin-1"), slash + path if slash else b"/" + path

    def _request_head(self, request: Request, route: routing.Route, path: bytes) -> tuple[bytes, Keys]:
        """The upstream request head and the request's stickiness/hash keys; with tracing on,
        the sampling decision (a Trace record for a traced request)."""
        tracing = self.tracing
        sampled = tracing is not None and tracing.root_sampled()  # for a request that starts a trace
        head, keys, request.chunked = request_head(request.method, path, request.headers, route.authority_bytes,
                                                   request.client.peer, request.upgrade, self.policy.key_names,
                                                   sampled=sampled)
        trace = request.trace
        if tracing is not None and trace is None and (
                sampled_parent(keys.traceparent) if keys.trace_from_client else sampled):
            trace = request.trace = Trace(request.method, request.client.peer, self.loop.time())
            trace.target(route.kind, route.host, path, route.capability)
        if trace is not None:
            trace.start_span(tracing, keys.traceparent, keys.trace_from_client, sampled)
        return head, keys

    def response_head(self, request: Request, exchange: Exchange, agent_id: str, set_cookie: str | None,
                       client_keep_alive: bool) -> tuple[bytes, bool, bool]:
        """(head for the client, re-chunk the body?, keep the client connection?)."""
        return response_head(exchange.status, exchange.reason, exchange.headers, request.version, client_keep_alive,
                             exchange.no_body, exchange.upgraded is not None, agent_id, set_cookie)

    def _send(self, client: ClientConnection, request: Request, head: bytes, conn: Upstream,
              flight: Flight) -> Exchange:
        """Write the request head (and the body so far) to ``conn``; the response goes to the new Exchange."""
        exchange = Exchange(client, conn, self.settings.read_timeout, request.method == b"HEAD", self.exchanges,
                            flight)
        conn.exchange = exchange
        conn.client = client
        client.upstream = conn
        conn.write_raw(head)
        request.attach(conn)
        return exchange

    # -- forwarding: the decisions are the Machine's (exchange.py), the callbacks' actions the Flight's
    # (flight.py). The only waiting is for a new upstream connection, a retry and tunnels, done by the
    # connection's task in ``fly``; ``begin`` starts a request on a pooled connection from the read callback.

    def _flight(self, client: ClientConnection, request: Request, route: routing.Route, path: bytes) -> Flight:
        started = self.loop.time()
        head, keys = self._request_head(request, route, path)
        machine = Machine(self.policy, self.metrics, self.catalog, route, keys, request.method, started)
        return Flight(self, client, request, machine, head)

    async def _forward(self, client: ClientConnection, request: Request, route: routing.Route, path: bytes,
                       call: Call | None = None) -> bool:
        flight = self._flight(client, request, route, path)
        if call is not None:
            self._a2a_call(flight, call)
        m = flight.m
        if m.admit() == ANSWER:
            assert m.error is not None
            raise m.error
        return await self.fly(flight)

    async def fly(self, flight: Flight, chosen: bool = False) -> bool:
        """The task's driver of the machine: attempt agents (or the passthrough host) until one answer
        is relayed; raises the ProxyError for the client otherwise. ``chosen``: the machine's choice is
        made (by ``begin``) and not yet sent."""
        client, request, m = flight.client, flight.request, flight.m
        try:
            while True:
                if not chosen and m.choose() == ANSWER:
                    assert m.error is not None
                    raise m.error
                chosen = False
                address, port = self._depart(flight)
                conn = self.pool.take(address, port)
                if conn is None:
                    try:
                        conn = await self.pool.connect(address, port, self.settings.connect_timeout)
                    except (TimeoutError, OSError) as exc:
                        action = m.connect_failed(self._connect_error(address, port, exc),
                                                  isinstance(exc, TimeoutError), client.closed, self.loop.time())
                        flight.noted(action, 0)
                        if action == RETRY:
                            continue
                        if action == GONE:
                            raise ClientGone from None
                        assert m.error is not None
                        raise m.error from None
                    except BaseException:
                        m.abandon()
                        raise
                    if client.closed:
                        self.pool.release(conn)
                        m.abandon()
                        raise ClientGone
                waiter = flight.waiter = self.loop.create_future()
                self._send(client, request, flight.head, conn, flight)
                action = await waiter
                if action == RETRY:
                    continue
                if action == UPGRADE:
                    return await flight.upgrade()
                if action == ANSWER and m.error is not None:
                    raise m.error
                if action == GONE:
                    raise ClientGone
                return m.keep
        finally:
            m.release()

    @staticmethod
    def _connect_error(address: str, port: int, exc: OSError) -> ProxyError:
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout("", f"connecting to {address}:{port} timed out")
        return UpstreamError("", f"cannot connect to {address}:{port}: {exc.strerror or exc}")

    def _depart(self, flight: Flight) -> tuple[str, int]:
        """Start the attempt the machine chose; where to send it."""
        m = flight.m
        m.depart(self.loop.time())
        choice = m.choice
        if choice is None:
            return m.route.host, m.route.port
        agent = choice.agent
        trace = flight.request.trace
        if trace is not None:
            flight.head = trace.start_attempt(self.tracing, flight.head, agent.id, agent.address, agent.port,
                                              choice.ticket.trial)
        return agent.address, agent.port

    def begin(self, client: ClientConnection, request: Request) -> bool:
        """Start ``request`` from the client's read callback; False leaves it to the connection's task.

        Taken for an in-zone target with an agent to choose and a pooled connection to it.
        Whatever needs waiting for (connecting, a retry, a tunnel) is handed to the task
        at the step it has reached; errors before the first attempt are left to the task.
        """
        if request.method == b"CONNECT" or request.upgrade or request.error is not None:
            return False
        try:
            authority, path = self._target(request)
            route = self._route(authority)
        except ProxyError:
            return False
        if route.kind == "external":
            return False
        if self.a2a is not None and (request.held is not None or path in CARD_PATHS):
            return False  # read the call (or answer the card) before choosing, in the task
        if self.access_log:
            request.trace = Trace(request.method, client.peer, self.loop.time())
            request.trace.target(route.kind, route.host, path, route.capability)
        flight = self._flight(client, request, route, path)
        m = flight.m
        if m.admit() == ANSWER or m.choose() == ANSWER:
            m.release()
            request.trace = None  # the task starts over, with a Trace of its own
            return False
        client.active = request
        client.busy = True
        self.fast_starts += 1
        choice = m.choice
        assert choice is not None
        agent = choice.agent
        conn = self.pool.take(agent.address, agent.port)
        if conn is None:
            client.hand_off(route.kind, functools.partial(self.fly, flight, True))
            return True
        self._depart(flight)
        self._send(client, request, flight.head, conn, flight)
        return True

    async def resume(self, client: ClientConnection, request: Request, kind: str,
                     job: Callable[[], Awaitable[bool]]) -> bool:
        """Run the rest of a request the fast path handed over; False when the client must be closed."""
        try:
            return await job()
        except ProxyError as err:
            return self.answer(client, request, kind, err)
        except ClientGone:
            return False

    def finished(self, request: Request) -> None:
        """A request with a Trace record is over: its spans end, its access log line is written."""
        trace = request.trace
        assert trace is not None
        request.trace = None
        body = None
        if trace.span is not None and request.method == b"POST" and request.replay is not None and request.body_done:
            body = b"".join(request.replay)
        try:
            trace.finish(self.loop.time(), body, self.settings.access_log)
        except Exception:
            log.exception("telling how a proxy request went failed")

    # -- A2A (docs/a2a.md): cards answered from the registry, calls kept on the agent holding their task

    async def _serve_card(self, client: ClientConnection, request: Request, route: routing.Route,
                          path: bytes) -> bool:
        """Answer the picked agent's card rewritten to the name the client used: from the registry, else
        read from the agent; False when neither has one (the request is then forwarded as it is)."""
        a2a = self.a2a
        assert a2a is not None
        m = Machine(self.policy, self.metrics, self.catalog, route, Keys(), request.method, self.loop.time())
        if m.admit() == ANSWER or m.choose() == ANSWER:
            m.release()
            assert m.error is not None
            raise m.error
        choice = m.choice
        assert choice is not None
        try:
            agent = choice.agent
            stored = a2a.cards.of(agent.name, agent.id)
            settings = self.settings
            raw = stored.card.raw if stored is not None else await fetch_card(
                agent.address, agent.port, path, a2a.max_card_bytes, settings.connect_timeout + settings.read_timeout)
            body = rewrite_card(raw, route.host) if raw is not None else None
        except ValueError:
            body = None  # not a card: the agent's own answer is forwarded
        finally:
            m.abandon()
            m.release()
        if body is None:
            return False
        self.metrics.a2a["card_served" if stored is not None else "card_fetched"] += 1
        self.count(route.kind, "ok", self.metrics.of_capability(route.capability).capability)
        client.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                     b"x-sidecar-agent: %s\r\n%s\r\n%s" % (len(body), agent.id.encode(),
                                                           b"" if request.keep_alive else b"connection: close\r\n",
                                                           body))
        return True

    def _a2a_call(self, flight: Flight, call: Call) -> None:
        """Route a call naming a known task or context to the agent holding it; learn from its answer."""
        flight.call = call
        if not call.routed:
            return
        assert self.a2a is not None
        owner = self.a2a.owners.owner(call)
        self.metrics.a2a["hit" if owner is not None else "miss"] += 1
        flight.m.pinned = owner

    def a2a_commit(self, flight: Flight, exchange: Exchange, agent_id: str) -> None:
        """The response head is going to the client: a stream gets the stream idle timeout, an A2A call's
        answer is read for the task and context it names."""
        a2a = self.a2a
        assert a2a is not None
        content_type = b""
        for name, value in exchange.headers:
            if len(name) == 12 and name.lower() == b"content-type":
                content_type = value
                break
        if b"event-stream" in content_type:
            exchange.timeout = a2a.stream_idle_timeout
        if flight.call is None or not agent_id:
            return
        tap = exchange.tap = Learner(a2a.owners, agent_id, a2a.max_body, content_type)
        for chunk in exchange.body:
            tap.feed(chunk)
        if exchange.complete:
            tap.close()

    def close(self) -> None:
        """Close every client connection and pooled upstream connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            connection.abort()
        self.pool.close()


