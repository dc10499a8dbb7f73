"""Forwarding names outside the zone to upstream resolvers.

Each attempt sends the client's message under a fresh random ID from a fresh
UDP socket (a random source port), retries over TCP when the UDP response has
TC set, and moves on to the next upstream on timeout, network error, a
mismatched response, SERVFAIL or REFUSED. The upstream that answered last is
tried first next time. ``forward`` returns None when every upstream failed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from ..metrics import DnsMetrics

log = logging.getLogger(__name__)

DNS_PORT = 53
_SERVFAIL, _REFUSED = 2, 5
_UNSPECIFIED = ("0.0.0.0", "::", "")


def parse_hostport(text: str, default_port: int = DNS_PORT) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port


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


class _UdpExchange(asyncio.DatagramProtocol):
    """Waits for the one datagram that answers ``message`` (same ID and question); others are ignored."""

    def __init__(self, message: bytes, question_end: int) -> None:
        self.message = message
        self.question_end = question_end
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if self.done.done() or not _answers(self.message, data, self.question_end):
            return
        self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("socket closed"))


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
        query = secrets.token_bytes(2) + message[2:]
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._udp(upstream, query, question_end)
                if response[2] & 0x02:
                    response = await self._tcp(upstream, query, question_end)
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

    async def _udp(self, upstream: tuple[str, int], query: bytes, question_end: int) -> bytes:
        loop = asyncio.get_running_loop()
        transport, exchange = await loop.create_datagram_endpoint(
            lambda: _UdpExchange(query, question_end), remote_addr=upstream)
        try:
            transport.sendto(query)
            return await exchange.done
        finally:
            transport.close()

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
