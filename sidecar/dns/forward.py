"""Forwarding names outside the zone to upstream resolvers.

Each attempt sends the client's message under a random ID (unused on that
socket) from one of ``POOL_SIZE`` UDP sockets per upstream, picked at random.
Each socket has its own kernel-chosen source port and is retired (closed once
its last reply is in) after ``SOCKET_USES`` queries or ``SOCKET_SECONDS``, so
source ports keep changing; a reply is taken only when its ID, QR bit and
question (case included) match a query waiting on that socket, from the
connected upstream.
A TC response is retried over TCP; the next upstream is tried on timeout,
network error, SERVFAIL or REFUSED. The upstream that answered last is tried
first next time. ``forward`` returns None when every upstream failed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from ..metrics import DnsMetrics

log = logging.getLogger(__name__)

DNS_PORT = 53
_SERVFAIL, _REFUSED = 2, 5
_UNSPECIFIED = ("0.0.0.0", "::", "")
# UDP sockets per upstream, and queries each sends before it is replaced by one on a new port.
POOL_SIZE = 8
SOCKET_USES = 256
SOCKET_SECONDS = 30.0


def resolv_conf_upstreams(listen: tuple[str, int], path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The nameservers of resolv.conf, without the sidecar's own listening address (in a pod it is one)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        log.warning("cannot read %s (%s): no upstream resolvers", path, exc)
        return []
    listen_host, listen_port = listen
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] != "nameserver":
            continue
        host = parts[1].split("%", 1)[0]
        if listen_port == DNS_PORT and (host == listen_host or listen_host in _UNSPECIFIED):
            continue
        found.append((host, DNS_PORT))
    return found


class _UdpSocket(asyncio.DatagramProtocol):
    """One UDP socket connected to one upstream, shared by queries with distinct IDs."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        # ID -> (the query as sent, where its question ends, who waits for the reply)
        self.pending: dict[bytes, tuple[bytes, int, asyncio.Future[bytes]]] = {}
        self.uses = 0
        self.opened = time.monotonic()
        # Done once opening is over: True when connected, False when opening failed.
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    @property
    def retired(self) -> bool:
        """No new queries: opening failed, used up, closing or too old (one still opening is not)."""
        if not self.ready.done():
            return False
        return (not self.ready.result() or self.transport is None or self.transport.is_closing()
                or self.uses >= SOCKET_USES or time.monotonic() - self.opened > SOCKET_SECONDS)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.opened = time.monotonic()

    def datagram_received(self, data: bytes, addr: object) -> None:
        waiting = self.pending.get(data[:2])
        if waiting is None:
            return
        query, question_end, done = waiting
        if not done.done() and _answers(query, data, question_end):
            done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable...) are per socket, and every query on it went to the same upstream.
        self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("socket closed"))

    def _fail(self, exc: BaseException) -> None:
        for _, _, done in self.pending.values():
            if not done.done():
                done.set_exception(exc)

    def release(self, qid: bytes) -> None:
        """Forget the query ``qid``; a retired socket closes with its last query."""
        del self.pending[qid]
        if self.retired and not self.pending and self.transport is not None:
            self.transport.close()


class UpstreamError(Exception):
    """One attempt at one upstream failed; ``reason`` is the metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Forwarder:
    """Sends a query message to the upstreams in turn; the first good response wins."""

    def __init__(self, upstreams: Sequence[tuple[str, int]], timeout: float, metrics: DnsMetrics) -> None:
        self.upstreams = list(upstreams)
        self.timeout = timeout
        self._metrics = metrics
        self._first = 0
        self._sockets: dict[tuple[str, int], list[_UdpSocket | None]] = {}
        self._rng = random.SystemRandom()

    def close(self) -> None:
        """Close every UDP socket (queries waiting on them fail)."""
        for pool in self._sockets.values():
            for sock in pool:
                if sock is not None and sock.transport is not None:
                    sock.transport.close()
        self._sockets = {}

    async def forward(self, message: bytes) -> bytes | None:
        """The upstream response to ``message`` with the client's ID, or None when all upstreams failed."""
        started = time.perf_counter()
        question_end = _question_end(message)
        count = len(self.upstreams)
        for step in range(count):
            index = (self._first + step) % count
            host, port = upstream = self.upstreams[index]
            try:
                response = await self._exchange(upstream, message, question_end)
            except UpstreamError as exc:
                self._metrics.upstream_errors[(f"{host}:{port}", exc.reason)] += 1
                continue
            self._first = index
            self._metrics.forwarded["answered"] += 1
            self._metrics.forward_seconds.observe(time.perf_counter() - started)
            return message[:2] + response[2:]
        self._metrics.forwarded["failed"] += 1
        self._metrics.forward_seconds.observe(time.perf_counter() - started)
        return None

    async def _exchange(self, upstream: tuple[str, int], message: bytes, question_end: int) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._udp(upstream, message, question_end)
                if response[2] & 0x02:
                    response = await self._tcp(upstream, secrets.token_bytes(2) + message[2:], question_end)
        except TimeoutError:
            raise UpstreamError("timeout") from None
        except (OSError, EOFError, asyncio.IncompleteReadError):
            raise UpstreamError("network") from None
        rcode = response[3] & 0x0F
        if rcode == _SERVFAIL:
            raise UpstreamError("servfail")
        if rcode == _REFUSED:
            raise UpstreamError("refused")
        return response

    async def _udp(self, upstream: tuple[str, int], message: bytes, question_end: int) -> bytes:
        sock = await self._socket(upstream)
        qid = secrets.token_bytes(2)
        while qid in sock.pending:
            qid = secrets.token_bytes(2)
        query = qid + message[2:]
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        sock.pending[qid] = (query, question_end, done)
        sock.uses += 1
        try:
            assert sock.transport is not None
            sock.transport.sendto(query)
            return await done
        finally:
            sock.release(qid)

    async def _socket(self, upstream: tuple[str, int]) -> _UdpSocket:
        """A random socket of ``upstream``'s pool, opened (on a new port) when its slot is empty or retired."""
        pool = self._sockets.setdefault(upstream, [None] * POOL_SIZE)
        slot = self._rng.randrange(POOL_SIZE)
        sock = pool[slot]
        if sock is None or sock.retired:
            if sock is not None and not sock.pending and sock.transport is not None:
                sock.transport.close()  # retired by age while idle: no last reply will close it
            opening = pool[slot] = _UdpSocket()
            try:
                await asyncio.get_running_loop().create_datagram_endpoint(lambda: opening, remote_addr=upstream)
            finally:
                if not opening.ready.done():
                    opening.ready.set_result(opening.transport is not None)
            return opening
        if not sock.ready.done():
            # Another query is opening this slot's socket; a cancelled waiter must not cancel that.
            await asyncio.shield(sock.ready)
        if not sock.ready.result():
            raise ConnectionError(f"cannot open a UDP socket to {upstream}")
        return sock

    async def _tcp(self, upstream: tuple[str, int], query: bytes, question_end: int) -> bytes:
        reader, writer = await asyncio.open_connection(*upstream)
        try:
            writer.write(len(query).to_bytes(2, "big") + query)
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                response = await reader.readexactly(size)
                if _answers(query, response, question_end):
                    return response
        finally:
            writer.close()


def _question_end(message: bytes) -> int:
    """Where the (one, uncompressed) question of ``message`` ends; 12 when it cannot be walked."""
    end = 12
    try:
        while message[end]:
            if message[end] > 63:
                return 12
            end += message[end] + 1
    except IndexError:
        return 12
    return end + 5


def _answers(query: bytes, response: bytes, question_end: int) -> bool:
    """Whether ``response`` is a response to ``query``: same ID, QR set, the same question (case included)."""
    return (len(response) >= question_end and response[:2] == query[:2] and bool(response[2] & 0x80)
            and response[12:question_end] == query[12:question_end])
