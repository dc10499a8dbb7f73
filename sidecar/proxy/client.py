"""The client side of the relay: one ``ClientConnection`` per client socket parses
request heads with llhttp and serves its requests in order; each ``Request``
streams its body to the upstream connection attached to it.
"""

from __future__ import annotations

import asyncio
import logging
import typing
from collections import deque
from collections.abc import Awaitable, Callable

import httptools

from ..errors import BadRequest, HeadersTooLarge, ProxyError

if typing.TYPE_CHECKING:
    from .observe import Trace
    from .relay import Relay
    from .upstream import Upstream

log = logging.getLogger(__name__)

# Bodies up to this size are kept so an idempotent request can be sent again.
REPLAY_LIMIT = 64 * 1024
# Request body buffered while no upstream is attached before reading pauses.
PENDING_LIMIT = 256 * 1024
# Pipelined requests queued before reading pauses.
PIPELINE_LIMIT = 16


class Request:
    """One client request: head, and a body that is streamed to the attached upstream."""

    __slots__ = ("body_done", "chunked", "client", "done_waiter", "error", "headers", "held", "keep_alive", "method",
                 "pending", "pending_size", "replay", "replay_size", "sink", "trace", "upgrade", "url", "version")

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
        self.trace: Trace | None = None  # only while the access log or tracing is on
        # An A2A call's body, kept whole (up to a2a.max_body) to read what it names before an agent is chosen.
        self.held: bytearray | None = None
        self.done_waiter: asyncio.Future[None] | None = None

    def feed(self, chunk: bytes) -> None:
        held = self.held
        if held is not None:
            held += chunk
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
            if self.pending_size > PENDING_LIMIT and held is None:
                self.client.pause_reading("pending")

    async def whole(self) -> bytes:
        """The whole body (the caller made it ``held``, bounded by its Content-Length)."""
        if not self.body_done:
            self.done_waiter = self.client.loop.create_future()
            self.client.resume_reading("pending")
            await self.done_waiter
        return bytes(self.held or b"")

    def finish(self) -> None:
        self.body_done = True
        waiter = self.done_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
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



def json_within(headers: list[tuple[bytes, bytes]], max_body: int) -> bool:
    """Whether a POST may be an A2A call to read before choosing: JSON with a Content-Length within ``max_body``
    (compiled here, with the request it looks at; a2a.py is not)."""
    length = -1
    json_body = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            length = int(value) if value.strip().isdigit() else -1
        elif lower == b"content-type":
            json_body = b"json" in value.lower()
    return json_body and 0 < length <= max_body


def may_be_call(body: bytearray) -> bool:
    """Whether ``body`` may hold a JSON-RPC call (a2a.read_call reads it); False for certain without parsing.

    A call's object has the member "jsonrpc": the name is in the bytes as such, or written with a
    \\u escape, or the JSON is UTF-16/32 (json.loads takes those too; their ASCII has NUL bytes).
    """
    return b"jsonrpc" in body or b"\\u" in body or b"\x00" in body


class ClientConnection:
    """One client socket: parse, queue and serve requests in order; then maybe a tunnel.

    An asyncio protocol by its methods, not by inheritance: without a Python base class,
    mypyc compiles it as a native class (docs/proxy.md, "Compiled hot path").
    """

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
        # The last request this connection serves has been read (it was not keep-alive): what the
        # client sends after it is ignored, never answered (a 400 after `connection: close` is not HTTP).
        self.final = False
        self.last_active = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        # An A2A candidate whose start waits for its body, while that body comes in the same read:
        # decided at its end (on_message_complete), else handed to the task when the read is over.
        self.early: Request | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if peer else b""
        self.relay.connections.add(self)
        self.relay.metrics.connections += 1
        self.last_active = self.loop.time()
        self.idle_timer = self.loop.call_at(self.last_active + self.relay.settings.idle_timeout, self._idle_check)
        self.task = self.loop.create_task(self.serve())

    def eof_received(self) -> bool | None:
        return None  # close the transport, as asyncio.Protocol does

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.connections.discard(self)
        self.relay.metrics.connections -= 1
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        # A task waiting for the rest of an A2A call's body: there is none coming.
        current = self.current
        if current is not None and current.done_waiter is not None and not current.done_waiter.done():
            current.done_waiter.set_result(None)
        upstream = self.upstream
        if upstream is not None:
            upstream.client_gone()

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if self.raw_buffer is not None:
            self.last_active = self.loop.time()  # a tunnel's activity, for its stream idle timeout
            if upstream is not None and upstream.tunnel:
                upstream.write_raw(data)
            else:
                self.raw_buffer.append(data)
            return
        if self.final:
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
        early = self.early
        if early is not None:  # its body is still coming: the task reads it whole, as it may be a call
            self.early = None
            self._enqueue(early)

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
        a2a = self.relay.a2a
        if a2a is not None and request.method == b"POST" and json_within(request.headers, a2a.max_body):
            request.held = bytearray()  # an A2A call's body is read before an agent is chosen
            if not self.busy and not self.queue and not request.upgrade:
                self.early = request  # a body that is no call takes the fast path (on_message_complete)
                return
        if not self.busy and not self.queue and self.relay.begin(self, request):
            return
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        """Leave ``request`` to the connection's task, after those before it."""
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
        request = self.current
        if request is not None:
            request.finish()
            self.current = None
            if not request.keep_alive and not request.upgrade:
                self.final = True
            if request is self.early:
                self.early = None
                held = request.held
                if held is not None and not may_be_call(held):
                    request.held = None  # relayed as any request, from this read callback when it can be
                    if self.relay.begin(self, request):
                        return
                self._enqueue(request)

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
        settings = self.relay.settings
        now = self.loop.time()
        upstream = self.upstream
        if upstream is not None and upstream.tunnel:
            # A tunnel: ``last_active`` is its last byte either way (both sides' data_received).
            timeout = settings.stream_idle_timeout
            if upstream.read_paused or "upstream" in self.paused:
                self.last_active = now  # a side that cannot take more is slow, not idle
            elif now - self.last_active >= timeout:
                upstream.close()
                self.close()
                return
        else:
            timeout = settings.idle_timeout
            if not self.busy and not self.queue and now - self.last_active >= timeout:
                self.close()
                return
        self.idle_timer = self.loop.call_at(max(now, self.last_active) + timeout, self._idle_check)

    def watch_tunnel(self) -> None:
        """This connection is now a tunnel: its idle timer counts ``proxy.stream_idle_timeout`` from now."""
        self.last_active = self.loop.time()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = self.loop.call_at(self.last_active + self.relay.settings.stream_idle_timeout,
                                            self._idle_check)

    def _protocol_error(self, err: ProxyError) -> None:
        self.relay.metrics.client_errors.labels(type(err).__name__).inc()
        if self.final:
            return  # bytes after the connection's last request: the connection closes after its answer
        request = self.current
        self.current = None
        self.pause_reading("error")
        if request is not None and request is self.early:
            self.early = None
            self.queue.append(request)  # answered with the error below
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
        if request.trace is not None:
            self.relay.finished(request)
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


