"""The HTTP/1 relay: asyncio Protocols + httptools, bodies relayed as bytes.

One ``ClientConnection`` per client socket parses request heads with llhttp and
serves its requests in order from one task. Each attempt borrows an
``Upstream`` connection from the per-agent ``Pool``; bodies flow between the two
protocols in callbacks (never buffered whole), with backpressure both ways
(a paused writer pauses the reader on the other side). Upgrade and CONNECT
turn both sockets into a raw tunnel. Policy (which agent, breakers, retries)
is asked of ``Policy``; every typed error becomes a response in
``error_response``, and nowhere else.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import json
import logging
import math
import random
import re
import typing
from collections import deque
from collections.abc import Awaitable, Callable

import httptools

from ..catalog import Catalog
from ..config import LoadBalancerSettings, ProxySettings, StickySettings
from ..errors import (
    BadRequest,
    CircuitOpen,
    HeadersTooLarge,
    NoHealthyAgent,
    Overloaded,
    PassthroughDisabled,
    ProxyError,
    UnknownTarget,
    UpstreamError,
    UpstreamTimeout,
)
from ..metrics import ProxyMetrics
from ..model import Agent
from . import routing
from .affinity import cookie_value
from .load import Outcome, OutcomeKind
from .policy import Choice, Keys, Policy
from .retries import safe_to_retry

if typing.TYPE_CHECKING:
    from prometheus_client import Histogram

log = logging.getLogger(__name__)

# Bodies up to this size are kept so an idempotent request can be sent again.
REPLAY_LIMIT = 64 * 1024
# Request body buffered while no upstream is attached before reading pauses.
PENDING_LIMIT = 256 * 1024
# Pipelined requests queued before reading pauses.
PIPELINE_LIMIT = 16
MAX_IDLE_PER_AGENT = 128
# Pooled connections older than this are not reused: below the 5 s keep-alive of
# uvicorn and Node, so the agent rarely closes one under a request we just sent.
UPSTREAM_IDLE = 4.0

HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
))
_TRACEPARENT = re.compile(rb"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_INVALID_TRACE = (b"0" * 32, b"0" * 16)

# (error type, status, code); the first matching row wins.
_ERRORS: tuple[tuple[type[ProxyError], int, str], ...] = (
    (BadRequest, 400, "bad_request"),
    (HeadersTooLarge, 431, "headers_too_large"),
    (UnknownTarget, 404, "unknown_target"),
    (PassthroughDisabled, 403, "passthrough_disabled"),
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


class KeyNames:
    """The request headers and cookies that name a session or a hash key, as the head scan wants them."""

    __slots__ = ("balancing", "cookie", "hash_cookie", "hash_header", "session", "sticky")

    def __init__(self, sticky: StickySettings, balancing: LoadBalancerSettings) -> None:
        self.sticky = sticky
        self.balancing = balancing
        self.session = sticky.header.lower().encode()
        self.cookie = sticky.cookie
        self.hash_header = balancing.hash_header.lower().encode()
        self.hash_cookie = balancing.hash_cookie


_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"upgrade"))
_NO_TOKENS: frozenset[bytes] = frozenset()


def _connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    """Header names listed in ``Connection`` headers beyond the standard hop-by-hop ones."""
    if len(values) == 1 and values[0].lower() in _PLAIN_CONNECTION:
        return _NO_TOKENS
    return frozenset(t.strip().lower() for v in values for t in v.split(b",")) - HOP_BY_HOP


# Request headers the head scan acts on besides copying (hop-by-hop ones included).
_REQUEST_SEEN = HOP_BY_HOP | {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"traceparent",
                              b"cookie"}


def request_head(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], host: bytes, peer: bytes,
                 upgrade: bool, names: KeyNames, drop: frozenset[bytes] = frozenset()) -> tuple[bytes, Keys, bool]:
    """(upstream request head, stickiness/hash keys, body chunked?): hop-by-hop headers and those
    named in ``Connection`` dropped, one ``X-Forwarded-For`` with ``peer`` appended,
    ``X-Forwarded-Proto``/``-Host``, a valid or new ``traceparent``, the given ``host``."""
    session_name = names.session
    hash_header = names.hash_header
    forwarded_for: list[bytes] = []
    connection: list[bytes] = []
    proto = forwarded_host = traceparent = b""
    chunked = False
    keys = Keys()
    cookies: list[bytes] = []
    out = [method, b" ", path, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lower = name.lower()
        if drop and lower in drop:
            continue
        if lower in _REQUEST_SEEN:
            if lower in HOP_BY_HOP:
                if lower == b"connection":
                    connection.append(value)
                elif lower == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                continue
            if lower == b"host":
                continue
            if lower == b"x-forwarded-for":
                forwarded_for.append(value.strip())
                continue
            if lower == b"traceparent":
                if _TRACEPARENT.match(value) and value[3:35] != _INVALID_TRACE[0] and value[36:52] != \
                        _INVALID_TRACE[1] and value[:2] != b"ff":
                    traceparent = value
                continue
            # A client's own X-Forwarded-Proto/-Host (it came through another proxy) is kept, once.
            if lower == b"x-forwarded-proto":
                proto = value
                continue
            if lower == b"x-forwarded-host":
                forwarded_host = value
                continue
            cookies.append(value)
        if lower == session_name:
            keys.session = value.decode("latin-1")
        if lower == hash_header:
            keys.hash_key = value.decode("latin-1")
        out += (name, b": ", value, b"\r\n")
    if connection and not drop:
        tokens = _connection_tokens(connection)
        if tokens:  # rare: Connection names end-to-end headers; scan again without them
            return request_head(method, path, headers, host, peer, upgrade, names, tokens)
    if cookies:
        text = "; ".join(c.decode("latin-1") for c in cookies)
        keys.affinity_cookie = cookie_value(text, names.cookie)
        if names.hash_cookie and keys.hash_key is None:
            keys.hash_key = cookie_value(text, names.hash_cookie)
    if forwarded_for:
        forwarded_for.append(peer)
        xff = b", ".join(f for f in forwarded_for if f)
    else:
        xff = peer
    if not traceparent:
        traceparent = b"00-%032x-%016x-01" % (random.getrandbits(128) or 1, random.getrandbits(64) or 1)
    out += (b"host: ", host, b"\r\nx-forwarded-for: ", xff, b"\r\nx-forwarded-proto: ", proto or b"http",
            b"\r\nx-forwarded-host: ", forwarded_host or host, b"\r\ntraceparent: ", traceparent, b"\r\n")
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if upgrade:
        for name, value in headers:
            if name.lower() == b"upgrade":
                out += (b"connection: upgrade\r\nupgrade: ", value, b"\r\n")
                break
    out.append(b"\r\n")
    return b"".join(out), keys, chunked


def response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], version: str, keep_alive: bool,
                  no_body: bool, upgraded: bool, agent_id: str, set_cookie: str | None,
                  drop: frozenset[bytes] = frozenset()) -> tuple[bytes, bool, bool]:
    """(head for the client, re-chunk the body?, keep the client connection?): hop-by-hop headers
    and those named in ``Connection`` dropped, ``x-sidecar-agent`` and ``set-cookie`` added, framing
    and ``Connection`` fitted to the client's HTTP version."""
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    length = False
    upgrade_value = b""
    connection: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == b"connection":
                connection.append(value)
            elif lower == b"upgrade":
                upgrade_value = value
            continue
        if drop and lower in drop:
            continue
        if lower == b"content-length":
            length = True
        out += (name, b": ", value, b"\r\n")
    if connection and not drop:
        tokens = _connection_tokens(connection)
        if tokens:
            return response_head(status, reason, headers, version, keep_alive, no_body, upgraded, agent_id,
                                 set_cookie, tokens)
    if agent_id:
        out += (b"x-sidecar-agent: ", agent_id.encode(), b"\r\n")
    if set_cookie:
        out += (b"set-cookie: ", set_cookie.encode("latin-1"), b"\r\n")
    frame_chunked = False
    keep = keep_alive
    if upgraded:
        out += (b"connection: upgrade\r\nupgrade: ", upgrade_value, b"\r\n")
    elif not no_body and status != 204 and status != 304 and not length:
        # Upstream chunked or close-delimited: the relay frames the body for the client.
        if version == "1.1":
            frame_chunked = True
            out.append(b"transfer-encoding: chunked\r\n")
        else:
            keep = False
    if not upgraded:
        if not keep:
            out.append(b"connection: close\r\n")
        elif version == "1.0":
            out.append(b"connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out), frame_chunked, keep


class Durations:
    """Observations for a Prometheus histogram, counted into its buckets here and added on ``flush``.

    ``Histogram.observe`` takes a lock and walks the buckets on every request; this is a
    bisect and two additions. Without the histogram internals it relies on (``_upper_bounds``,
    ``_buckets``, ``_sum`` of prometheus_client) it keeps the values and observes them on flush.
    """

    __slots__ = ("bounds", "counts", "histogram", "total", "values")

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        bounds = getattr(histogram, "_upper_bounds", None)
        buckets = getattr(histogram, "_buckets", None)
        usable = (isinstance(bounds, list) and isinstance(buckets, list) and len(bounds) == len(buckets)
                  and bounds and bounds[-1] == math.inf and hasattr(histogram, "_sum"))
        self.bounds: list[float] | None = list(bounds) if usable else None  # type: ignore[arg-type]
        self.counts = [0] * len(self.bounds or ())
        self.total = 0.0
        self.values: list[float] = []

    def observe(self, seconds: float) -> None:
        """Count one observation (not visible in Prometheus until ``flush``)."""
        if self.bounds is None:
            self.values.append(seconds)
            return
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def flush(self) -> None:
        """Add everything observed since the last flush to the histogram."""
        histogram = self.histogram
        if self.bounds is None:
            values, self.values = self.values, []
            for value in values:
                histogram.observe(value)
            return
        if not self.total and not any(self.counts):
            return
        counts, self.counts = self.counts, [0] * len(self.counts)
        total, self.total = self.total, 0.0
        for bucket, count in zip(histogram._buckets, counts, strict=True):  # type: ignore[attr-defined]
            if count:
                bucket.inc(count)
        histogram._sum.inc(total)  # type: ignore[attr-defined]


class _ClientGone(Exception):
    """The client hung up while its request was being served."""


class _AttemptFailed(Exception):
    """One upstream attempt failed before a usable response head."""

    def __init__(self, kind: OutcomeKind, sent: bool, error: ProxyError) -> None:
        super().__init__(str(error))
        self.kind = kind
        self.sent = sent
        self.error = error


class Flight:
    """One request forwarded to agents, across its attempts."""

    __slots__ = ("attempt_started", "choice", "client", "head", "keep", "keys", "last_agent", "last_error", "relay",
                 "released", "request", "route", "started", "tried")

    def __init__(self, relay: Relay, client: ClientConnection, request: Request, route: routing.Route, head: bytes,
                 keys: Keys, started: float) -> None:
        self.relay = relay
        self.client = client
        self.request = request
        self.route = route
        self.head = head
        self.keys = keys
        self.started = started
        self.tried: list[str] = []
        self.choice: Choice | None = None
        self.attempt_started = started
        self.last_error: ProxyError | None = None
        self.last_agent = ""
        self.keep = True  # keep the client connection after this response
        self.released = False  # the target's concurrency slot is given back


class Request:
    """One client request: head, and a body that is streamed to the attached upstream."""

    __slots__ = ("body_done", "chunked", "client", "error", "headers", "keep_alive", "method", "pending",
                 "pending_size", "replay", "replay_size", "sink", "upgrade", "url", "version")

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False
        self.chunked = False
        self.body_done = False
        self.error: ProxyError | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.replay: list[bytes] | None = []
        self.replay_size = 0
        self.sink: Upstream | None = None

    def feed(self, chunk: bytes) -> None:
        if self.replay is not None:
            self.replay_size += len(chunk)
            if self.replay_size <= REPLAY_LIMIT:
                self.replay.append(chunk)
            else:
                self.replay = None
        sink = self.sink
        if sink is not None:
            sink.write_body(chunk, self.chunked)
        else:
            self.pending.append(chunk)
            self.pending_size += len(chunk)
            if self.pending_size > PENDING_LIMIT:
                self.client.pause_reading("pending")

    def finish(self) -> None:
        self.body_done = True
        if self.sink is not None and self.chunked:
            self.sink.write_raw(b"0\r\n\r\n")

    def attach(self, sink: Upstream) -> None:
        """Send the body so far to ``sink`` and stream the rest to it."""
        chunks = self.replay if self.replay is not None else self.pending
        for chunk in chunks:
            sink.write_body(chunk, self.chunked)
        self.pending = []
        self.pending_size = 0
        self.sink = sink
        self.client.resume_reading("pending")
        if self.body_done and self.chunked:
            sink.write_raw(b"0\r\n\r\n")

    def detach(self) -> None:
        self.sink = None

    @property
    def replayable(self) -> bool:
        return self.replay is not None


class ClientConnection(asyncio.Protocol):
    """One client socket: parse, queue and serve requests in order; then maybe a tunnel."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = b""
        self.queue: deque[Request] = deque()
        self.current: Request | None = None
        self.active: Request | None = None
        self.upstream: Upstream | None = None
        self.raw_buffer: list[bytes] | None = None
        self.header_bytes = 0
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        # The rest of the active request, handed from the fast path to the task: (kind, job).
        self.handoff: tuple[str, Callable[[], Awaitable[bool]]] | None = None
        self.paused: set[str] = set()
        self.closed = False
        self.busy = False
        self.last_active = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if peer else b""
        self.relay.connections.add(self)
        self.relay.metrics.connections.inc()
        self.last_active = self.loop.time()
        self.idle_timer = self.loop.call_at(self.last_active + self.relay.settings.idle_timeout, self._idle_check)
        self.task = self.loop.create_task(self.serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.connections.discard(self)
        self.relay.metrics.connections.dec()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        upstream = self.upstream
        if upstream is not None:
            upstream.client_gone()

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if self.raw_buffer is not None:
            if upstream is not None and upstream.tunnel:
                upstream.write_raw(data)
            else:
                self.raw_buffer.append(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0]:]
            self.raw_buffer = [rest] if rest else []
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._protocol_error(cause if isinstance(cause, ProxyError) else BadRequest("", str(exc)))
        except httptools.HttpParserError as exc:
            self._protocol_error(BadRequest("", f"malformed request: {exc}"))

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- httptools callbacks

    # No on_message_begin: one callback less per request; the first piece of a URL begins a request.
    def on_url(self, url: bytes) -> None:
        request = self.current
        if request is None:
            request = self.current = Request(self)
            self.header_bytes = 0
        request.url += url
        self.header_bytes += len(url)
        if self.header_bytes > self.relay.settings.max_header_bytes:
            raise HeadersTooLarge("", "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name, value))
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.relay.settings.max_header_bytes:
            raise HeadersTooLarge("", f"request headers exceed {self.relay.settings.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        request = self.current
        assert request is not None
        parser = self.parser
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        request.upgrade = parser.should_upgrade()
        if not self.busy and not self.queue and self.relay.begin(self, request):
            return
        self.queue.append(request)
        if len(self.queue) > PIPELINE_LIMIT:
            self.pause_reading("pipeline")
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.feed(body)

    def on_message_complete(self) -> None:
        if self.current is not None:
            self.current.finish()
            self.current = None

    # -- flow control

    def pause_reading(self, reason: str) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self.paused:
            self.paused.discard(reason)
            if not self.paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _idle_check(self) -> None:
        timeout = self.relay.settings.idle_timeout
        now = self.loop.time()
        if not self.busy and not self.queue and now - self.last_active >= timeout:
            self.close()
            return
        self.idle_timer = self.loop.call_at(max(now, self.last_active) + timeout, self._idle_check)

    def _protocol_error(self, err: ProxyError) -> None:
        self.relay.metrics.client_errors.labels(type(err).__name__).inc()
        request = self.current
        self.current = None
        self.pause_reading("error")
        if request is not None and request is self.active:
            # Mid-body: the request head is already upstream; nothing sane can follow.
            self.abort()
            return
        if request is None or request not in self.queue:
            request = Request(self)
            self.queue.append(request)
        request.error = err
        request.keep_alive = False
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- serving

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def hand_off(self, kind: str, job: Callable[[], Awaitable[bool]]) -> None:
        """Let the task finish the active request with ``job`` (the fast path cannot wait)."""
        self.handoff = (kind, job)
        self._wake()

    def done(self, request: Request, keep: bool) -> bool:
        """The active request is answered; close the connection unless it may serve another."""
        self.active = None
        self.busy = False
        self.last_active = self.loop.time()
        if not keep or not request.keep_alive or not request.body_done or request.upgrade:
            self.close()
            return False
        if self.queue:
            self._wake()  # pipelined requests arrived meanwhile: the task serves them
        return True

    async def serve(self) -> None:
        try:
            while True:
                handoff = self.handoff
                if handoff is not None:
                    # Run even when the client has gone: the job gives back what the request holds.
                    self.handoff = None
                    request = self.active
                    assert request is not None
                    if not self.done(request, await self.relay.resume(self, request, *handoff)):
                        return
                    continue
                if self.closed:
                    return
                if self.busy or not self.queue:
                    self.waiter = self.loop.create_future()
                    await self.waiter
                    self.waiter = None
                    continue
                request = self.queue.popleft()
                self.resume_reading("pipeline")
                self.active = request
                self.busy = True
                if not self.done(request, await self.relay.handle(self, request)):
                    return
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception:
            log.exception("proxy connection from %s failed", self.peer.decode())
            self.abort()


class Upstream(asyncio.Protocol):
    """One connection to an agent (or passthrough host): HTTP responses, or a raw tunnel."""

    def __init__(self, relay: Relay, key: tuple[str, int], tunnel: bool = False) -> None:
        self.relay = relay
        self.key = key
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.client: ClientConnection | None = None
        self.tunnel = tunnel
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.read_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.pool.forget(self)
        exchange = self.exchange
        if exchange is not None:
            exchange.on_lost()
        client = self.client
        if self.tunnel and client is not None:
            client.close()

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            if self.client is not None:
                self.client.write(data)
            return
        exchange = self.exchange
        if exchange is None:
            self.close()  # bytes on an idle connection: not ours to interpret
            return
        exchange.last = exchange.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            exchange.on_upgrade(data[upgrade.args[0]:])
        except httptools.HttpParserError as exc:
            exchange.on_garbage(str(exc))
            self.close()
        if exchange.landing:
            exchange.land()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading("upstream")

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading("upstream")

    # httptools callbacks, forwarded to the exchange
    def on_status(self, reason: bytes) -> None:
        if self.exchange is not None:
            self.exchange.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.exchange is not None:
            self.exchange.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.on_head(self.parser.get_status_code(), self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_body(body)

    def on_message_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.on_complete()

    # writing and lifecycle
    def write_raw(self, data: bytes) -> None:
        # A transport the agent is closing gets nothing: connection_lost follows and fails the attempt.
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            if self.exchange is not None:
                self.exchange.last = self.exchange.loop.time()

    def write_body(self, chunk: bytes, chunked: bool) -> None:
        if self.closed or self.transport is None or not chunk:
            return
        if chunked:
            self.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            self.transport.write(chunk)
        if self.exchange is not None:
            self.exchange.last = self.exchange.loop.time()

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def client_gone(self) -> None:
        """The client hung up: this connection's response has nowhere to go."""
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.relay.pool.forget(self)


class Exchange:
    """One attempt's response as it arrives, held until the relay commits to it.

    The response head and the end of the body are reported either to a waiting task
    (``head`` and ``waiter`` futures) or, on the fast path, straight to the ``flight``'s
    callbacks in the relay, from inside the upstream socket's read callback.
    """

    __slots__ = ("active", "body", "client", "committed", "complete", "conn", "failure", "flight", "frame_chunked",
                 "head", "headed", "headers", "keep_alive", "landing", "last", "loop", "no_body", "reason", "status",
                 "timeout", "upgraded", "waiter")

    def __init__(self, client: ClientConnection, conn: Upstream, timeout: float, no_body: bool,
                 active: set[Exchange], flight: Flight | None = None) -> None:
        self.client = client
        self.conn = conn
        self.loop = client.loop
        self.flight = flight
        # Set only when a task waits for the head (the fast path is called back instead).
        self.head: asyncio.Future[None] | None = None if flight is not None else self.loop.create_future()
        self.headed = False  # the head (or the failure before it) has been reported
        # Fast path: the head has arrived; the relay is told once the read that brought it has been
        # parsed, so a small response goes to the client whole, in one write.
        self.landing = False
        # The end of the response body: ``failure`` or ``complete``; ``waiter`` only if someone waits.
        self.failure: ProxyError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.no_body = no_body
        self.body: list[bytes] = []
        self.committed = False
        self.complete = False
        self.frame_chunked = False
        self.upgraded: bytes | None = None
        self.timeout = timeout
        self.last = self.loop.time()
        # Watched by the relay's sweeper (one timer for all exchanges, not one each).
        self.active = active
        active.add(self)

    def check(self, now: float) -> None:
        """Fail the exchange when the agent has been silent for ``timeout`` seconds."""
        if self.conn.read_paused:
            self.last = now  # the client is slow, not the agent
        if now - self.last < self.timeout:
            return
        self.stop_timer()
        error = UpstreamTimeout("", f"no response from the agent for {self.timeout:g}s")
        if not self.headed:
            self._head_failed(error)
        else:
            self._fail(error)
        self.conn.close()

    def stop_timer(self) -> None:
        self.active.discard(self)

    def _head_arrived(self) -> None:
        if self.headed:
            return
        self.headed = True
        if self.flight is not None:
            self.landing = True
        elif self.head is not None:
            self.head.set_result(None)

    def land(self) -> None:
        """Fast path: hand the arrived head (and the body parsed with it) to the relay."""
        self.landing = False
        flight = self.flight
        if flight is not None:
            try:
                flight.relay._landed(flight, self)
            except Exception:
                flight.relay._broken(flight, self)

    def _head_failed(self, error: ProxyError) -> None:
        if self.headed:
            return
        self.headed = True
        flight = self.flight
        if flight is not None:
            self.flight = None
            flight.relay._crashed(flight, self, error)
        elif self.head is not None:
            self.head.set_exception(error)

    def on_head(self, status: int, keep_alive: bool) -> None:
        if 100 <= status < 200 and status != 101:
            # Interim (100 Continue): straight to the client; the real head follows.
            self.client.write(b"HTTP/1.1 %d %s\r\n\r\n" % (status, self.reason or b"Continue"))
            self.headers = []
            self.reason = b""
            self.status = -1
            return
        self.status = status
        self.keep_alive = keep_alive
        if self.no_body:
            # A HEAD response: llhttp cannot be told, so it would wait for Content-Length bytes.
            self.keep_alive = False
        self._head_arrived()
        if self.no_body:
            self._finish()

    def on_body(self, chunk: bytes) -> None:
        if self.no_body:
            return
        if self.committed:
            if self.frame_chunked:
                self.client.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))  # type: ignore[union-attr]
            else:
                self.client.write(chunk)
        else:
            self.body.append(chunk)

    def on_complete(self) -> None:
        if self.status == -1:  # end of an interim response
            self.status = 0
            return
        self._finish()

    def on_upgrade(self, rest: bytes) -> None:
        self.upgraded = rest
        self.keep_alive = False
        self._head_arrived()

    def on_garbage(self, detail: str) -> None:
        error = UpstreamError("", f"invalid response from the agent: {detail}")
        if not self.headed:
            self._head_failed(error)
        else:
            self._fail(error)

    def on_lost(self) -> None:
        if not self.headed:
            self._head_failed(UpstreamError("", "the agent closed the connection before responding"))
        elif not self.complete:
            if self.upgraded is None and not self._framed():
                self._finish()  # a close-delimited body ends here
            else:
                self._fail(UpstreamError("", "the agent closed the connection mid-response"))

    def _framed(self) -> bool:
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                return True
        return self.no_body

    def _finish(self) -> None:
        if self.complete:
            return
        self.complete = True
        self.stop_timer()
        if self.committed:
            if self.frame_chunked:
                self.client.write(b"0\r\n\r\n")
            self._wake()

    def commit(self, head: bytes, frame_chunked: bool) -> None:
        """Send the response head (and what arrived of the body) to the client; stream the rest."""
        self.committed = True
        self.frame_chunked = frame_chunked
        body = self.body
        if not body and not frame_chunked:
            self.client.write(head)
        else:
            # One write for head, body so far and terminator: small responses cost one send().
            out = [head]
            if frame_chunked:
                for chunk in body:
                    out.extend((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                if self.complete:
                    out.append(b"0\r\n\r\n")
            else:
                out.extend(body)
            self.body = []
            self.client.write(b"".join(out))
        if self.complete:
            self._wake()

    def _fail(self, error: ProxyError) -> None:
        if self.failure is None and not self.complete:
            self.failure = error
            self._wake()

    def _wake(self) -> None:
        if self.landing:
            return  # the relay has not seen the head yet; ``land`` looks at failure and completion
        flight = self.flight
        if flight is not None:
            self.flight = None  # report the end once
            try:
                flight.relay._arrived(flight, self)
            except Exception:
                flight.relay._broken(flight, self)
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def finished(self) -> None:
        """Wait until the whole response has been relayed; raises the ProxyError that cut it short."""
        if not (self.complete and self.committed) and self.failure is None:
            self.waiter = self.loop.create_future()
            await self.waiter
        if self.failure is not None:
            raise self.failure


class Pool:
    """Idle keep-alive upstream connections per (address, port), newest first."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._idle: dict[tuple[str, int], list[Upstream]] = {}
        self.reuses = 0

    def take(self, address: str, port: int) -> Upstream | None:
        """A fresh pooled connection to address:port, or None."""
        idle = self._idle.get((address, port))
        if idle:
            horizon = self.relay.loop.time() - min(self.relay.settings.idle_timeout, UPSTREAM_IDLE)
            while idle:
                conn = idle.pop()
                if not conn.closed and conn.idle_since > horizon:
                    conn.reused = True
                    self.reuses += 1
                    return conn
                conn.close()
        return None

    async def acquire(self, address: str, port: int, connect_timeout: float) -> Upstream:
        """A connected Upstream: a pooled one if any is fresh, else a new connection.

        Raises asyncio.TimeoutError or OSError when connecting fails.
        """
        conn = self.take(address, port)
        if conn is not None:
            return conn
        key = (address, port)
        async with asyncio.timeout(connect_timeout):
            _, conn = await self.relay.loop.create_connection(lambda: Upstream(self.relay, key), address, port)
        self.relay.metrics.upstream_connections.inc()
        return conn

    def release(self, conn: Upstream) -> None:
        """Return a connection whose last response completed and that may be reused."""
        conn.exchange = None
        conn.client = None
        conn.resume_reading()
        if conn.closed:
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_AGENT:
            conn.close()
            return
        conn.idle_since = self.relay.loop.time()
        idle.append(conn)

    def forget(self, conn: Upstream) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in list(idle):
                conn.close()
        self._idle.clear()


class Relay:
    """Everything the connections share: settings, catalog, policy, pool, metrics."""

    def __init__(self, settings: ProxySettings, zone: str, catalog: Catalog, policy: Policy,
                 metrics: ProxyMetrics, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.settings = settings
        self.zone = zone
        self.catalog = catalog
        self.policy = policy
        self.metrics = metrics
        self.loop = loop or asyncio.get_running_loop()
        self.pool = Pool(self)
        self.connections: set[ClientConnection] = set()
        self.exchanges: set[Exchange] = set()
        self._tally: dict[tuple[str, str], int] = {}
        self._attempt_tally: dict[str, int] = {}  # by OutcomeKind value (an Enum's __hash__ is Python code)
        self.durations = Durations(metrics.request_seconds)
        self._routes: dict[str, routing.Route] = {}
        self._key_names: KeyNames | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep()

    def _sweep(self) -> None:
        self.flush_metrics()
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
        self.policy.update(proxy=settings)
        self._routes.clear()

    # Per-request counters are tallied in plain dicts and added to Prometheus by the
    # sweeper (at most a second late): a locked Counter.inc per request costs more.
    def _count(self, kind: str, outcome: str) -> None:
        key = (kind, outcome)
        self._tally[key] = self._tally.get(key, 0) + 1

    def _count_attempt(self, kind: OutcomeKind) -> None:
        outcome = kind._value_
        self._attempt_tally[outcome] = self._attempt_tally.get(outcome, 0) + 1

    def flush_metrics(self) -> None:
        """Add the tallied per-request counts to the Prometheus collectors."""
        metrics = self.metrics
        tally, self._tally = self._tally, {}
        for (kind, outcome), count in tally.items():
            metrics.requests.labels(kind, outcome).inc(count)
        self.durations.flush()
        attempts, self._attempt_tally = self._attempt_tally, {}
        for outcome, count in attempts.items():
            metrics.attempts.labels(outcome).inc(count)
        if self.pool.reuses:
            metrics.pool_reuses.inc(self.pool.reuses)
            self.pool.reuses = 0

    # -- one request

    async def handle(self, client: ClientConnection, request: Request) -> bool:
        """Serve one request; False when the client connection must close afterwards."""
        kind = "bad"
        try:
            if request.error is not None:
                raise request.error
            authority, path = self._target(request)
            if request.method == b"CONNECT":
                kind = "connect"
                return await self._connect(client, request, authority)
            route = self._route(authority)
            kind = route.kind
            if route.kind == "external":
                if not self.settings.passthrough:
                    raise PassthroughDisabled(route.host, f"{route.host} is outside {self.zone} and passthrough is off")
                return await self._passthrough(client, request, route, path)
            return await self._forward(client, request, route, path)
        except ProxyError as err:
            return self._answer(client, request, kind, err)
        except _ClientGone:
            return False

    def _answer(self, client: ClientConnection, request: Request, kind: str, err: ProxyError) -> bool:
        """Send ``err`` as the response; whether the client connection may stay open."""
        self._count(kind, error_status(err)[1])
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

    def _request_head(self, request: Request, path: bytes, host: str) -> tuple[bytes, Keys]:
        """The upstream request head and the request's stickiness/hash keys."""
        sticky = self.policy.affinity.settings
        balancing = self.policy.balancing
        names = self._key_names
        if names is None or names.sticky is not sticky or names.balancing is not balancing:
            names = self._key_names = KeyNames(sticky, balancing)
        head, keys, request.chunked = request_head(request.method, path, request.headers, host.encode("latin-1"),
                                                   request.client.peer, request.upgrade, names)
        return head, keys

    def _response_head(self, request: Request, exchange: Exchange, agent_id: str, set_cookie: str | None,
                       client_keep_alive: bool) -> tuple[bytes, bool, bool]:
        """(head for the client, re-chunk the body?, keep the client connection?)."""
        return response_head(exchange.status, exchange.reason, exchange.headers, request.version, client_keep_alive,
                             exchange.no_body, exchange.upgraded is not None, agent_id, set_cookie)

    async def _attempt(self, client: ClientConnection, request: Request, head: bytes, address: str,
                       port: int) -> Exchange:
        """Send the request to address:port and wait for its response head."""
        pool = self.pool
        try:
            conn = await pool.acquire(address, port, self.settings.connect_timeout)
        except TimeoutError:
            raise _AttemptFailed(OutcomeKind.TIMEOUT, False,
                                 UpstreamTimeout("", f"connecting to {address}:{port} timed out")) from None
        except OSError as exc:
            raise _AttemptFailed(OutcomeKind.CONNECT_ERROR, False,
                                 UpstreamError("", f"cannot connect to {address}:{port}: {exc.strerror or exc}")) \
                from None
        if client.closed:
            pool.release(conn)
            raise _ClientGone
        exchange = self._send(client, request, head, conn, None)
        assert exchange.head is not None
        try:
            await exchange.head
        except ProxyError as err:
            raise self._attempt_failed(client, request, exchange, err) from None
        return exchange

    def _send(self, client: ClientConnection, request: Request, head: bytes, conn: Upstream,
              flight: Flight | None) -> Exchange:
        """Write the request head (and the body so far) to ``conn``; the response goes to the new Exchange."""
        exchange = Exchange(client, conn, self.settings.read_timeout, request.method == b"HEAD", self.exchanges,
                            flight)
        conn.exchange = exchange
        conn.client = client
        client.upstream = conn
        conn.write_raw(head)
        request.attach(conn)
        return exchange

    def _attempt_failed(self, client: ClientConnection, request: Request, exchange: Exchange,
                        err: ProxyError) -> _AttemptFailed:
        """Drop an attempt whose response head never came."""
        self._discard(client, request, exchange)
        kind = OutcomeKind.TIMEOUT if isinstance(err, UpstreamTimeout) else OutcomeKind.RESET
        return _AttemptFailed(kind, True, err)

    def _discard(self, client: ClientConnection, request: Request, exchange: Exchange) -> None:
        request.detach()
        client.upstream = None
        exchange.stop_timer()
        exchange.flight = None
        exchange.conn.exchange = None
        exchange.conn.close()

    # -- forwarding to agents: the same steps, run by the connection's task (``_fly``) or,
    # while nothing needs awaiting, from the socket callbacks (``begin``, ``_landed``, ``_arrived``).

    def _flight(self, client: ClientConnection, request: Request, route: routing.Route, path: bytes) -> Flight:
        started = self.loop.time()
        head, keys = self._request_head(request, path, route.authority)
        return Flight(self, client, request, route, head, keys, started)

    async def _forward(self, client: ClientConnection, request: Request, route: routing.Route, path: bytes) -> bool:
        flight = self._flight(client, request, route, path)
        self.policy.limits.acquire(route.key)
        self.policy.budget.request()
        return await self._fly(flight)

    async def _fly(self, flight: Flight, choice: Choice | None = None) -> bool:
        """Attempt agents until one answer is relayed; raises the ProxyError for the client otherwise."""
        policy = self.policy
        client, request = flight.client, flight.request
        try:
            while True:
                if choice is None:
                    choice = self._choose(flight)
                agent = self._depart(flight, choice)
                try:
                    exchange = await self._attempt(client, request, flight.head, agent.address, agent.port)
                except _AttemptFailed as failed:
                    self._failed(flight, choice, failed)  # raises unless another attempt may follow
                    choice = None
                    continue
                except BaseException:
                    policy.loads.finish(agent.id)
                    policy.breakers.release(choice.ticket)
                    raise
                if self._judge(flight, choice, exchange):
                    choice = None
                    continue
                return await self._land(flight, choice, exchange)
        finally:
            self._release(flight)

    async def _land(self, flight: Flight, choice: Choice, exchange: Exchange) -> bool:
        try:
            return await self._relay_response(flight.client, flight.request, exchange, choice.agent.id,
                                              choice.set_cookie, flight.route.kind, flight.started)
        finally:
            self.policy.loads.finish(choice.agent.id)
            self._release(flight)

    def _release(self, flight: Flight) -> None:
        if not flight.released:
            flight.released = True
            self.policy.limits.release(flight.route.key)

    def _choose(self, flight: Flight) -> Choice:
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
        self.policy.loads.start(agent.id)
        flight.attempt_started = self.loop.time()
        return agent

    def _failed(self, flight: Flight, choice: Choice, failed: _AttemptFailed) -> None:
        """Account a failed attempt; returns when another may follow, else raises the client's error."""
        policy = self.policy
        agent_id = choice.agent.id
        policy.loads.finish(agent_id)
        if flight.client.closed:
            policy.breakers.release(choice.ticket)
            raise _ClientGone
        policy.breakers.record(choice.ticket, True)
        self._count_attempt(failed.kind)
        policy.observe(Outcome(agent_id, failed.kind, self.loop.time() - flight.attempt_started))
        failed.error.target = flight.route.host
        flight.last_error, flight.last_agent = failed.error, agent_id
        if self._can_choose_again(flight.route, flight.tried) and \
                self._may_retry(flight.request, failed.sent, len(flight.tried), policy.balancing.retries.attempts):
            return
        failed.error.agent_id = agent_id
        raise failed.error

    def _judge(self, flight: Flight, choice: Choice, exchange: Exchange) -> bool:
        """Account an attempt's response head; True when it was dropped for another attempt."""
        policy = self.policy
        agent_id = choice.agent.id
        status = exchange.status
        retry_after = _retry_after(exchange) if status == 429 or status == 503 else 0.0
        if status in policy.balancing.circuit_breaker.failure_statuses:
            kind = OutcomeKind.FAILURE_STATUS
        elif status == 429 or retry_after:
            kind = OutcomeKind.BACKPRESSURE
        else:
            kind = OutcomeKind.SUCCESS
        policy.breakers.record(choice.ticket, kind is OutcomeKind.FAILURE_STATUS)
        self._count_attempt(kind)
        policy.observe(Outcome(agent_id, kind, self.loop.time() - flight.attempt_started, status, retry_after))
        if (kind is not OutcomeKind.SUCCESS and self._can_choose_again(flight.route, flight.tried)
                and self._may_retry(flight.request, True, len(flight.tried), policy.balancing.retries.attempts)):
            # Another agent may do better; with nobody else to ask, this answer goes to the client.
            self._discard(flight.client, flight.request, exchange)
            policy.loads.finish(agent_id)
            flight.last_error = UpstreamError(flight.route.host, f"the agent answered {status}")
            flight.last_agent = agent_id
            return True
        return False

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
        policy = self.policy
        flight = self._flight(client, request, route, path)
        try:
            policy.limits.acquire(route.key)
        except ProxyError:
            return False
        try:
            choice = policy.choose(route, self.catalog.snapshot, flight.keys, flight.tried)
        except ProxyError:
            policy.limits.release(route.key)
            return False
        policy.budget.request()
        client.active = request
        client.busy = True
        agent = choice.agent
        conn = self.pool.take(agent.address, agent.port)
        if conn is None:
            client.hand_off(route.kind, functools.partial(self._fly, flight, choice))
            return True
        self._depart(flight, choice)
        self._send(client, request, flight.head, conn, flight)
        return True

    def _landed(self, flight: Flight, exchange: Exchange) -> None:
        """Fast path: the response head (and what came with it) arrived; relay it or try elsewhere."""
        choice = flight.choice
        assert choice is not None
        client, request = flight.client, flight.request
        if self._judge(flight, choice, exchange):
            client.hand_off(flight.route.kind, functools.partial(self._fly, flight))
            return
        if exchange.upgraded is not None:
            exchange.flight = None
            client.hand_off(flight.route.kind, functools.partial(self._land, flight, choice, exchange))
            return
        head, frame_chunked, flight.keep = self._response_head(request, exchange, choice.agent.id,
                                                               choice.set_cookie, request.keep_alive)
        self.durations.observe(self.loop.time() - flight.started)
        self._count(flight.route.kind, "ok")
        exchange.commit(head, frame_chunked)
        if exchange.failure is not None:
            exchange._wake()

    def _broken(self, flight: Flight, exchange: Exchange) -> None:
        """Fast path: a bug, not a peer's doing; log it and cut both connections, as the task would."""
        log.exception("proxy request from %s failed", flight.client.peer.decode())
        exchange.flight = None
        exchange.stop_timer()
        exchange.conn.exchange = None
        exchange.conn.close()
        flight.client.abort()
        self._release(flight)

    def _arrived(self, flight: Flight, exchange: Exchange) -> None:
        """Fast path: the response ended (complete, or cut short); pool or close both sides."""
        choice = flight.choice
        assert choice is not None
        client, request = flight.client, flight.request
        conn = exchange.conn
        request.detach()
        client.upstream = None
        self.policy.loads.finish(choice.agent.id)
        self._release(flight)
        keep = flight.keep
        if exchange.failure is not None:
            exchange.stop_timer()
            conn.exchange = None
            conn.close()
            client.abort()
            keep = False
        elif exchange.keep_alive and not exchange.no_body and request.body_done:
            self.pool.release(conn)
        else:
            conn.exchange = None
            conn.close()
        client.done(request, keep)

    def _crashed(self, flight: Flight, exchange: Exchange, error: ProxyError) -> None:
        """Fast path: the attempt failed before a response head; retry from the task, or answer."""
        choice = flight.choice
        assert choice is not None
        client, request = flight.client, flight.request
        failed = self._attempt_failed(client, request, exchange, error)
        try:
            self._failed(flight, choice, failed)
        except _ClientGone:
            self._release(flight)
            client.done(request, False)
            return
        except ProxyError as err:
            self._release(flight)
            client.done(request, self._answer(client, request, flight.route.kind, err))
            return
        client.hand_off(flight.route.kind, functools.partial(self._fly, flight))

    async def resume(self, client: ClientConnection, request: Request, kind: str,
                     job: Callable[[], Awaitable[bool]]) -> bool:
        """Run the rest of a request the fast path handed over; False when the client must be closed."""
        try:
            return await job()
        except ProxyError as err:
            return self._answer(client, request, kind, err)
        except _ClientGone:
            return False

    def _can_choose_again(self, route: routing.Route, tried: list[str]) -> bool:
        return self.policy.has_another(route, self.catalog.snapshot, tried)

    def _may_retry(self, request: Request, sent: bool, tried: int, attempts: int) -> bool:
        if tried > attempts:
            return False
        if not safe_to_retry(request.method, sent, request.replayable and request.body_done):
            return False
        if not self.policy.budget.try_retry():
            self.metrics.retry_budget_exhausted.inc()
            return False
        self.metrics.retries.inc()
        return True

    async def _relay_response(self, client: ClientConnection, request: Request, exchange: Exchange, agent_id: str,
                              set_cookie: str | None, kind: str, started: float) -> bool:
        """Commit to ``exchange``: send its head, stream its body, then pool or close both sides."""
        head, frame_chunked, keep = self._response_head(request, exchange, agent_id, set_cookie,
                                                        request.keep_alive)
        exchange.commit(head, frame_chunked)
        self.durations.observe(self.loop.time() - started)
        self._count(kind, "ok")
        conn = exchange.conn
        if exchange.upgraded is not None:
            exchange.stop_timer()
            return await self._tunnel(client, conn, exchange.upgraded)
        try:
            await exchange.finished()
        except ProxyError:
            exchange.stop_timer()
            client.upstream = None
            request.detach()
            conn.exchange = None
            conn.close()
            client.abort()
            return False
        finally:
            request.detach()
        client.upstream = None
        if exchange.keep_alive and not exchange.no_body and request.body_done:
            self.pool.release(conn)
        else:
            conn.exchange = None
            conn.close()
        return keep

    async def _tunnel(self, client: ClientConnection, conn: Upstream, upstream_early: bytes) -> bool:
        """Relay raw bytes both ways until either side closes."""
        conn.exchange = None
        conn.tunnel = True
        conn.client = client
        client.upstream = conn
        if upstream_early:
            client.write(upstream_early)
        for chunk in client.raw_buffer or ():
            conn.write_raw(chunk)
        client.raw_buffer = []
        client.resume_reading("error")
        self.metrics.tunnels.inc()
        try:
            while not client.closed and not conn.closed:
                client.waiter = self.loop.create_future()
                await client.waiter
        finally:
            self.metrics.tunnels.dec()
            conn.close()
        return False

    async def _passthrough(self, client: ClientConnection, request: Request, route: routing.Route,
                           path: bytes) -> bool:
        started = self.loop.time()
        head, _ = self._request_head(request, path, route.authority)
        try:
            exchange = await self._attempt(client, request, head, route.host, route.port)
        except _AttemptFailed as failed:
            failed.error.target = route.host
            raise failed.error from None
        return await self._relay_response(client, request, exchange, "", None, "external", started)

    async def _connect(self, client: ClientConnection, request: Request, authority: str) -> bool:
        try:
            route = routing.route(authority, self.zone, default_port=443)
        except ValueError as exc:
            raise BadRequest(authority, str(exc)) from None
        agent_id = ""
        ticket = None
        if route.kind == "external":
            if not self.settings.passthrough:
                raise PassthroughDisabled(route.host, f"{route.host} is outside {self.zone} and passthrough is off")
            address, port = route.host, route.port
        else:
            choice = self.policy.choose(route, self.catalog.snapshot, Keys())
            agent_id, ticket = choice.agent.id, choice.ticket
            address, port = choice.agent.address, choice.agent.port
        key = (address, port)
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                _, conn = await self.loop.create_connection(lambda: Upstream(self, key, tunnel=True), address, port)
        except (TimeoutError, OSError) as exc:
            if ticket is not None:
                self.policy.breakers.record(ticket, True)
            err: ProxyError
            if isinstance(exc, TimeoutError):
                err = UpstreamTimeout(route.host, f"connecting to {address}:{port} timed out")
            else:
                err = UpstreamError(route.host, f"cannot connect to {address}:{port}: {exc.strerror or exc}")
            err.agent_id = agent_id
            raise err from None
        if ticket is not None:
            self.policy.breakers.record(ticket, False)
        self.metrics.upstream_connections.inc()
        head = b"HTTP/1.1 200 Connection Established\r\n"
        if agent_id:
            head += b"x-sidecar-agent: " + agent_id.encode() + b"\r\n"
        client.write(head + b"\r\n")
        self._count("connect", "ok")
        return await self._tunnel(client, conn, b"")

    def close(self) -> None:
        """Close every client connection and pooled upstream connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.flush_metrics()
        for connection in list(self.connections):
            connection.abort()
        self.pool.close()


def _retry_after(exchange: Exchange) -> float:
    for name, value in exchange.headers:
        if name.lower() == b"retry-after":
            text = value.strip()
            if text.isdigit():
                return float(text)
            return 1.0  # an HTTP-date: back off a little rather than parse clocks
    return 0.0
