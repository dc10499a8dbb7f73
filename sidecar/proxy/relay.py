"""The relay: routes each request, asks the policy for an agent, sends the request,
judges the response head (breaker, load, retry) and relays the answer. The steps of
one forwarded request are driven by ``Flight`` (flight.py) from the socket callbacks;
the client connection's task only waits for new connections and tunnels.
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
    NoHealthyAgent,
    PassthroughDisabled,
    ProxyError,
    TaskOwnerUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from ..metrics import ProxyMetrics
from ..model import Agent
from ..tracing import Tracing, sampled_parent
from . import routing, tunnel
from .a2a import CARD_PATHS, A2aRouting, Call, Learner, fetch_card, read_call, rewrite_card
from .client import ClientConnection, Request
from .flight import GONE, RETRY, UPGRADE, AttemptFailed, ClientGone, Flight
from .heads import Keys, request_head, response_head, retry_after
from .load import OutcomeKind
from .observe import Trace
from .policy import Choice, Policy
from .pool import Pool
from .responses import error_response, error_status
from .retries import safe_to_retry
from .upstream import Exchange, Upstream

log = logging.getLogger(__name__)
_SUCCESS = OutcomeKind.SUCCESS
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
    def count(self, kind: str, outcome: str) -> None:
        self.metrics.requests[(kind, outcome)] += 1

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
        self.count(kind, code)
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

    def attempt_failed(self, client: ClientConnection, request: Request, exchange: Exchange,
                        err: ProxyError) -> AttemptFailed:
        """Drop an attempt whose response head never came."""
        self._discard(client, request, exchange)
        kind = OutcomeKind.TIMEOUT if isinstance(err, UpstreamTimeout) else OutcomeKind.RESET
        return AttemptFailed(kind, True, err)

    def _discard(self, client: ClientConnection, request: Request, exchange: Exchange) -> None:
        request.detach()
        client.upstream = None
        exchange.stop_timer()
        exchange.flight = None
        exchange.conn.exchange = None
        exchange.conn.close()

    # -- forwarding: one set of steps (the state machine is ``Flight``, in flight.py). The only
    # waiting is for a new upstream connection and for tunnels, done by the connection's task
    # in ``fly``; ``begin`` starts a request on a pooled connection from the read callback.

    def _flight(self, client: ClientConnection, request: Request, route: routing.Route, path: bytes) -> Flight:
        started = self.loop.time()
        head, keys = self._request_head(request, route, path)
        return Flight(self, client, request, route, head, keys, started)

    async def _forward(self, client: ClientConnection, request: Request, route: routing.Route, path: bytes,
                       call: Call | None = None) -> bool:
        flight = self._flight(client, request, route, path)
        if call is not None:
            self._a2a_call(flight, call)
        if route.kind == "external":
            flight.released = True  # passthrough: no agent, no admission
        else:
            self.policy.admit(route)
        return await self.fly(flight)

    async def fly(self, flight: Flight, choice: Choice | None = None) -> bool:
        """Attempt agents (or the passthrough host) until one answer is relayed; raises the
        ProxyError for the client otherwise."""
        client, request, route = flight.client, flight.request, flight.route
        try:
            while True:
                if route.kind == "external":
                    address, port = route.host, route.port
                else:
                    if choice is None:
                        choice = self._choose(flight)
                    agent = self._depart(flight, choice)
                    address, port = agent.address, agent.port
                conn = self.pool.take(address, port)
                if conn is None:
                    try:
                        conn = await self._open(address, port)
                    except AttemptFailed as failed:
                        if choice is None:
                            failed.error.target = route.host
                            raise failed.error from None
                        self.failed(flight, choice, failed)  # raises unless another attempt may follow
                        choice = None
                        continue
                    except BaseException:
                        self._abandon(choice)
                        raise
                    if client.closed:
                        self.pool.release(conn)
                        self._abandon(choice)
                        raise ClientGone
                waiter = flight.waiter = self.loop.create_future()
                self._send(client, request, flight.head, conn, flight)
                step, value = await waiter
                if step is RETRY:
                    choice = None
                    continue
                if step is UPGRADE:
                    assert isinstance(value, Exchange)
                    return await flight.upgrade(value)
                if isinstance(value, ProxyError):
                    raise value
                if step is GONE:
                    raise ClientGone
                return bool(value)
        finally:
            self.release(flight)

    async def _open(self, address: str, port: int) -> Upstream:
        """A new connection to address:port; raises AttemptFailed (nothing was sent)."""
        try:
            return await self.pool.connect(address, port, self.settings.connect_timeout)
        except TimeoutError:
            raise AttemptFailed(OutcomeKind.TIMEOUT, False,
                                 UpstreamTimeout("", f"connecting to {address}:{port} timed out")) from None
        except OSError as exc:
            raise AttemptFailed(OutcomeKind.CONNECT_ERROR, False,
                                 UpstreamError("", f"cannot connect to {address}:{port}: {exc.strerror or exc}")) \
                from None

    def _abandon(self, choice: Choice | None) -> None:
        """An attempt that never reached its agent: it counts as nothing."""
        if choice is not None:
            self.policy.finish(choice)
            self.policy.release(choice)

    def release(self, flight: Flight) -> None:
        if not flight.released:
            flight.released = True
            self.policy.done(flight.route)

    def _choose(self, flight: Flight) -> Choice:
        if flight.pinned is not None:
            return self._owner(flight, flight.pinned)
        try:
            return self.policy.choose(flight.route, self.catalog.snapshot, flight.keys, flight.tried)
        except ProxyError:
            if flight.last_error is not None:
                flight.last_error.agent_id = flight.last_agent
                raise flight.last_error from None
            raise

    def _depart(self, flight: Flight, choice: Choice) -> Agent:
        agent = choice.agent
        flight.choice = choice
        flight.tried.append(agent.id)
        self.policy.started(choice)
        flight.attempt_started = self.loop.time()
        trace = flight.request.trace
        if trace is not None:
            flight.head = trace.start_attempt(self.tracing, flight.head, agent.id, agent.address, agent.port,
                                              choice.ticket.trial)
        return agent

    def failed(self, flight: Flight, choice: Choice, failed: AttemptFailed) -> None:
        """Account a failed attempt; returns when another may follow, else raises the client's error."""
        self.policy.finish(choice)
        if flight.client.closed:
            self.policy.release(choice)
            raise ClientGone
        failed.error.target = flight.route.host
        flight.last_error, flight.last_agent = failed.error, choice.agent.id
        if self._account(flight, choice, failed.kind, 0, 0.0, failed.sent):
            return
        failed.error.agent_id = choice.agent.id
        raise failed.error

    def judge(self, flight: Flight, choice: Choice, exchange: Exchange) -> bool:
        """Account an attempt's response head; True when it was dropped for another attempt."""
        status = exchange.status
        backoff = retry_after(exchange.headers) if status == 429 or status == 503 else 0.0
        kind = self.policy.classify(status, backoff)
        if not self._account(flight, choice, kind, status, backoff, True):
            return False
        # Another agent may do better; with nobody else to ask, this answer goes to the client.
        self._discard(flight.client, flight.request, exchange)
        self.policy.finish(choice)
        flight.last_error = UpstreamError(flight.route.host, f"the agent answered {status}")
        flight.last_agent = choice.agent.id
        return True

    def _account(self, flight: Flight, choice: Choice, kind: OutcomeKind, status: int, backoff: float,
                 sent: bool) -> bool:
        """Report an attempt's outcome to the policy and the metrics; whether to retry elsewhere."""
        if self.policy.report(choice, kind, self.loop.time() - flight.attempt_started, status, backoff):
            self.loop.call_soon(self.policy.fold)  # successes are folded in once per event-loop turn
        self.metrics.attempts[kind._value_] += 1  # the value: an Enum's __hash__ is Python code
        retry = kind is not _SUCCESS and self._may_retry(flight, sent)
        if flight.request.trace is not None:
            flight.request.trace.end_attempt(kind._value_, status, retry)
        return retry

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
        policy = self.policy
        flight = self._flight(client, request, route, path)
        try:
            policy.admit(route)
        except ProxyError:
            request.trace = None  # the task starts over, with a Trace of its own
            return False
        try:
            choice = policy.choose(route, self.catalog.snapshot, flight.keys, flight.tried)
        except ProxyError:
            policy.done(route)
            request.trace = None
            return False
        client.active = request
        client.busy = True
        self.fast_starts += 1
        agent = choice.agent
        conn = self.pool.take(agent.address, agent.port)
        if conn is None:
            client.hand_off(route.kind, functools.partial(self.fly, flight, choice))
            return True
        self._depart(flight, choice)
        self._send(client, request, flight.head, conn, flight)
        return True

    def settle(self, client: ClientConnection, request: Request, exchange: Exchange) -> bool:
        """The response has ended (complete, or cut short): pool or close the upstream connection,
        abort the client when the response was cut short. False when the client must not be reused."""
        conn = exchange.conn
        request.detach()
        client.upstream = None
        if exchange.failure is not None:
            exchange.stop_timer()
            conn.exchange = None
            conn.close()
            client.abort()
            return False
        if exchange.keep_alive and not exchange.no_body and request.body_done:
            self.pool.release(conn)
        else:
            conn.exchange = None
            conn.close()
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

    def _may_retry(self, flight: Flight, sent: bool) -> bool:
        """Whether a failed attempt may go to another agent: one is left, it is safe, the budget allows it."""
        request = flight.request
        if len(flight.tried) > self.policy.retry_attempts or flight.pinned is not None:
            return False  # a task's calls go to its owner or nowhere
        if not safe_to_retry(request.method, sent, request.replayable and request.body_done):
            return False
        if not self.policy.has_another(flight.route, self.catalog.snapshot, flight.tried):
            return False
        if not self.policy.spend_retry():
            self.metrics.retry_budget_exhausted.inc()
            return False
        self.metrics.retries.inc()
        return True

    def relayed(self, request: Request, exchange: Exchange, kind: str, agent_id: str, started: float) -> None:
        """Account a response head relayed to the client."""
        self.metrics.observe_duration(self.loop.time() - started)
        self.count(kind, "ok")
        if request.trace is not None:
            request.trace.answered(exchange.status, "ok", agent_id)

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
        policy = self.policy
        policy.admit(route)
        try:
            choice = policy.choose(route, self.catalog.snapshot, Keys(), ())
        except ProxyError:
            policy.done(route)
            raise
        try:
            agent = choice.agent
            stored = a2a.cards.of(agent.name, agent.id)
            settings = self.settings
            raw = stored.card.raw if stored is not None else await fetch_card(
                agent.address, agent.port, path, a2a.max_body, settings.connect_timeout + settings.read_timeout)
            body = rewrite_card(raw, route.host) if raw is not None else None
        except ValueError:
            body = None  # not a card: the agent's own answer is forwarded
        finally:
            self._abandon(choice)
            policy.done(route)
        if body is None:
            return False
        self.metrics.a2a["card_served" if stored is not None else "card_fetched"] += 1
        self.count(route.kind, "ok")
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
        flight.pinned = owner

    def _owner(self, flight: Flight, agent_id: str) -> Choice:
        """The agent holding the flight's task or context, or TaskOwnerUnavailable (never another agent)."""
        route = flight.route
        snapshot = self.catalog.snapshot
        others = [a.id for a in self.policy.agents(route, snapshot) if a.id != agent_id]
        try:
            if agent_id in flight.tried or len(others) == len(self.policy.agents(route, snapshot)):
                raise NoHealthyAgent(route.host, "gone")
            return self.policy.choose(route, snapshot, flight.keys, others)
        except ProxyError as exc:
            self.metrics.a2a["owner_gone"] += 1
            raise TaskOwnerUnavailable(route.host, f"agent {agent_id}, which holds this task or context, cannot "
                                                   f"take it ({exc}); no other agent knows it") from None

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


