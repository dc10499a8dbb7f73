"""The I/O shell: UDP and TCP protocols doing receive -> answer -> send, nothing more.

In-zone questions are answered synchronously in the protocol callback (the
cached fast path first, then the general path); questions for other names
become tasks that wait for the upstreams. TCP carries several queries per
connection (RFC 7766: replies may come out of order) and closes after an idle
period with nothing pending.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, cast

from ..metrics import DnsMetrics
from .answers import Answers, Forward
from .forward import Forwarder

log = logging.getLogger(__name__)

# Forwarded questions waiting for upstreams at once; more are dropped (the client retries).
MAX_PENDING_FORWARDS = 1024
# Replies queued on one TCP connection before it stops reading.
TCP_MAX_PENDING = 64

_SAMPLE_MASK = DnsMetrics.LATENCY_SAMPLE - 1

# Linux (4.6+) getsockopt giving the socket's memory counters; the ninth is sk_drops, the datagrams the
# kernel dropped for it (its receive buffer full, mostly) and what /proc/net/udp shows as "drops".
_SO_MEMINFO = 55
_MEMINFO_DROPS = 8


def _timed(data: bytes) -> bool:
    """Whether to time this query: its ID is a multiple of LATENCY_SAMPLE (one in that many, IDs being random)."""
    return len(data) > 12 and not data[1] & _SAMPLE_MASK


class Handler:
    """What both transports share: the answers, the forwarder and the forwarding tasks."""

    def __init__(self, answers: Answers, forwarder: Forwarder | None, metrics: DnsMetrics) -> None:
        self.answers = answers
        self.forwarder = forwarder
        self.metrics = metrics
        self.tasks: set[asyncio.Task[None]] = set()

    def handle(self, data: bytes, tcp: bool, send: Callable[[bytes], None],
               fast_tried: bool = False) -> asyncio.Task[None] | None:
        """Answer ``data`` through ``send`` now, or start (and return) the task that will.

        ``fast_tried``: the caller has had ``Answers.fast`` decline this message (it is not asked twice).
        """
        timed = _timed(data)
        started = time.perf_counter() if timed else 0.0
        answers = self.answers
        reply_or_forward: bytes | Forward | None = None if fast_tried else answers.fast(data, tcp)
        if reply_or_forward is None:
            reply_or_forward = answers.answer(data, tcp)
        if timed and not isinstance(reply_or_forward, Forward):
            self.metrics.observe_latency(time.perf_counter() - started)
        if reply_or_forward is None:
            return None
        if isinstance(reply_or_forward, bytes):
            send(reply_or_forward)
            return None
        if len(self.tasks) >= MAX_PENDING_FORWARDS:
            self.metrics.dropped["overload"] += 1
            return None
        task = asyncio.get_running_loop().create_task(self._forward(reply_or_forward, send))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _forward(self, forward: Forward, send: Callable[[bytes], None]) -> None:
        assert self.forwarder is not None, "Answers refuses out-of-zone names when forwarding is off"
        response = await self.forwarder.forward(forward.message)
        send(self.answers.forwarded(forward, response))


def set_receive_buffer(sock: Any, requested: int) -> int:
    """Ask for a ``requested``-byte SO_RCVBUF (0: leave the default) and return the size the kernel reports.

    Linux caps the request at net.core.rmem_max and reports twice what it granted (its bookkeeping
    overhead included), so a 4 MiB request under a 4 MiB cap reads back 8 MiB.
    """
    if requested:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, requested)
        except OSError as exc:
            log.warning("could not set SO_RCVBUF to %d on the DNS UDP socket: %s", requested, exc)
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def receive_drops(sock: Any) -> int | None:
    """Datagrams the kernel dropped for ``sock`` since it was made; None where it does not say (not Linux)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 4 * (_MEMINFO_DROPS + 1))
    except (OSError, ValueError):  # no SO_MEMINFO here, or the socket is closed
        return None
    if len(raw) < 4 * (_MEMINFO_DROPS + 1):
        return None
    return int(struct.unpack_from("I", raw, 4 * _MEMINFO_DROPS)[0])


class UdpServer(asyncio.DatagramProtocol):
    def __init__(self, handler: Handler, receive_buffer: int = 0) -> None:
        self.handler = handler
        self.receive_buffer = receive_buffer
        self.transport: asyncio.DatagramTransport | None = None
        self.socket: Any = None
        self.granted_buffer = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._sendto = self.transport.sendto
        self.socket = self.transport.get_extra_info("socket")
        if self.socket is not None:
            self.granted_buffer = set_receive_buffer(self.socket, self.receive_buffer)

    def drops(self) -> int | None:
        """The kernel's count of datagrams dropped for this listener (None: not known)."""
        return None if self.socket is None else receive_drops(self.socket)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        handler = self.handler
        # The hot path (not one of the timed queries, see _timed): answered from the caches and sent.
        fast_tried = len(data) > 12 and data[1] & _SAMPLE_MASK != 0
        if fast_tried:
            reply = handler.answers.fast(data)
            if reply is not None:
                self._sendto(reply, addr)
                return
        try:
            handler.handle(data, False, lambda reply: self._sendto(reply, addr), fast_tried)
        except Exception:
            # Never let one message stop the listener; the fuzz tests keep this branch empty.
            handler.metrics.dropped["internal_error"] += 1
            log.exception("DNS message from %s failed", addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable from a client that went away and the like: expected at the edge.
        self.handler.metrics.dropped["socket_error"] += 1


class TcpConnection(asyncio.Protocol):
    """One client connection: 2-byte length-prefixed messages in, replies out, idle timeout."""

    def __init__(self, handler: Handler, idle_timeout: float, connections: set[TcpConnection]) -> None:
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pending: set[asyncio.Task[None]] = set()
        self._idle: asyncio.TimerHandle | None = None
        self._eof = False
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)
        self.handler.metrics.tcp_connections += 1
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.handler.metrics.tcp_connections -= 1
        if self._idle is not None:
            self._idle.cancel()
        for task in self._pending:
            task.cancel()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 2:
            size = int.from_bytes(buffer[:2], "big")
            if len(buffer) < 2 + size:
                break
            message = bytes(buffer[2:2 + size])
            del buffer[:2 + size]
            self._handle(message)
        self._arm_idle()

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its queries until it does.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self._paused:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self._eof = True
        if self._pending:
            return True  # keep the write side open for the replies still coming
        return False

    def _handle(self, message: bytes) -> None:
        try:
            task = self.handler.handle(message, True, self._send)
        except Exception:
            self.handler.metrics.dropped["internal_error"] += 1
            log.exception("DNS TCP message failed")
            task = None
        if task is None:
            return
        self._pending.add(task)
        task.add_done_callback(self._done)
        if len(self._pending) >= TCP_MAX_PENDING and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if self._paused and len(self._pending) < TCP_MAX_PENDING // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if not self._pending:
            if self._eof and self.transport is not None:
                self.transport.close()
            else:
                self._arm_idle()

    def _send(self, reply: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(len(reply).to_bytes(2, "big") + reply)

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(self.idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        if self._pending:
            self._arm_idle()
        elif self.transport is not None:
            self.transport.close()
