"""The agent side of the relay: an ``Upstream`` connection (HTTP responses or a raw
tunnel) and the ``Exchange``, one attempt's response as it arrives.
"""

from __future__ import annotations

import asyncio
import typing

import httptools

from ..errors import ProxyError, UpstreamError, UpstreamTimeout

if typing.TYPE_CHECKING:
    from .a2a import Learner
    from .client import ClientConnection
    from .flight import Flight
    from .relay import Relay


class Upstream:
    """One connection to an agent (or passthrough host): HTTP responses, or a raw tunnel.

    An asyncio protocol by its methods, not by inheritance (see ``ClientConnection``).
    """

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

    def eof_received(self) -> bool | None:
        return None  # close the transport, as asyncio.Protocol does

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
            client = self.client
            if client is not None:
                client.last_active = client.loop.time()  # the tunnel's activity (ClientConnection._idle_check)
                client.write(data)
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

    The response head, a failure before it, and the end of the body are reported to the
    ``flight``'s callbacks (``landed``, ``crashed``, ``arrived`` in flight.py), from
    inside the upstream socket's read callback; ``flight`` is None once the relay has
    let go of this attempt.
    """

    __slots__ = ("active", "body", "client", "committed", "complete", "conn", "failure", "flight", "frame_chunked",
                 "headed", "headers", "keep_alive", "landing", "last", "loop", "no_body", "reason", "status",
                 "tap", "timeout", "upgraded")

    def __init__(self, client: ClientConnection, conn: Upstream, timeout: float, no_body: bool,
                 active: set[Exchange], flight: Flight) -> None:
        self.client = client
        self.conn = conn
        self.loop = client.loop
        self.flight: Flight | None = flight
        self.headed = False  # the head (or the failure before it) has been reported
        # Fast path: the head has arrived; the relay is told once the read that brought it has been
        # parsed, so a small response goes to the client whole, in one write.
        self.landing = False
        # The end of the response body: ``failure`` or ``complete``.
        self.failure: ProxyError | None = None
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
        # An A2A response's reader (task and context owners), set by the relay when the head lands.
        self.tap: Learner | None = None
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

    def land(self) -> None:
        """Hand the arrived head (and the body parsed with it) to the relay."""
        self.landing = False
        flight = self.flight
        if flight is not None:
            try:
                flight.landed(self)
            except Exception:
                flight.broken(self)

    def _head_failed(self, error: ProxyError) -> None:
        if self.headed:
            return
        self.headed = True
        flight = self.flight
        if flight is not None:
            self.flight = None
            try:
                flight.crashed(self, error)
            except Exception:
                flight.broken(self)

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
        if self.tap is not None:
            self.tap.feed(chunk)
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
        if self.tap is not None:
            self.tap.close()
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
                flight.arrived(self)
            except Exception:
                flight.broken(self)


