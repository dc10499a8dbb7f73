"""The UDP listener's receive buffer (dns.udp_receive_buffer) and the kernel's drop count, on real sockets."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import dns.message
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import DnsSettings
from sidecar.dns.server import DnsServer
from sidecar.dns.transport import receive_drops
from sidecar.metrics import Metrics

from .conftest import AGENTS, catalog_of

pytestmark = pytest.mark.asyncio
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_RCVBUF doubling and SO_MEMINFO are Linux's")


def rmem_max() -> int:
    with open("/proc/sys/net/core/rmem_max") as handle:
        return int(handle.read())


def scraped(metrics: Metrics) -> dict[str, float]:
    text = metrics.exposition().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


async def started(metrics: Metrics, receive_buffer: int) -> DnsServer:
    settings = DnsSettings(listen="127.0.0.1:0", upstreams=("none",), udp_receive_buffer=receive_buffer)
    server = DnsServer(settings, catalog_of(AGENTS), metrics.dns)
    await server.start()
    return server


@linux
async def test_the_buffer_asked_for_is_set_within_the_kernels_cap_and_exposed() -> None:
    asked = 1 << 20
    metrics = Metrics()
    server = await started(metrics, asked)
    try:
        sock = server._udp.get_extra_info("socket")  # type: ignore[union-attr]
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # Linux doubles the (capped) request for its bookkeeping.
        assert granted == 2 * min(asked, rmem_max())
        assert scraped(metrics)["sidecar_dns_udp_receive_buffer_bytes"] == granted
    finally:
        await server.stop()


@linux
async def test_zero_keeps_the_kernels_default() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
        default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    metrics = Metrics()
    server = await started(metrics, 0)
    try:
        assert scraped(metrics)["sidecar_dns_udp_receive_buffer_bytes"] == default
    finally:
        await server.stop()


@linux
async def test_queries_dropped_while_the_loop_does_not_read_are_counted() -> None:
    """A small buffer, a blocked loop and a burst: the kernel's drops reach the metric; then answers resume."""
    metrics = Metrics()
    server = await started(metrics, 4096)
    sock = server._udp.get_extra_info("socket")  # type: ignore[union-attr]
    if receive_drops(sock) is None:
        await server.stop()
        pytest.skip("this kernel does not expose SO_MEMINFO")
    try:
        assert scraped(metrics)["sidecar_dns_udp_receive_drops_total"] == 0
        query = dns.message.make_query("chat.agents.local", "A").to_wire()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            # The loop runs none of its callbacks until this coroutine yields: nothing reads the listener.
            for _ in range(2000):
                client.sendto(query, ("127.0.0.1", server.port))
            drops = receive_drops(sock)
            assert drops is not None and drops > 0
            assert scraped(metrics)["sidecar_dns_udp_receive_drops_total"] == drops
            # The queued ones are answered once the loop reads again.
            client.setblocking(False)
            answered = 0
            deadline = time.monotonic() + 10
            while not answered and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                try:
                    while client.recv(4096):
                        answered += 1
                except BlockingIOError:
                    pass
            assert answered > 0
    finally:
        await server.stop()
