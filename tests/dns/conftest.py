"""The agents the DNS tests resolve, in a catalog filled by hand (no etcd)."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from sidecar.catalog import Catalog, Reset, Snapshot
from sidecar.model import Agent, parse_agent

REVISION = 42


def make_agent(agent_id: str, name: str, address: str, port: int, caps: list[str], **extra: Any) -> Agent:
    return parse_agent({"id": agent_id, "name": name, "address": address, "port": port, "capabilities": caps,
                        **extra})


AGENTS = [
    make_agent("a1", "alpha", "10.0.0.1", 8001, ["chat", "search"], tags=["gpu"], zone="z1", version="1.2",
               metadata={"team": "ml", "model": "x"}),
    make_agent("a2", "alpha", "10.0.0.2", 8002, ["chat"], zone="z2", weight=50),
    make_agent("b1", "beta", "2001:db8::1", 9000, ["Vision"], zone="z1"),
    make_agent("d1", "gamma", "10.0.0.9", 9100, ["dead"], health={"status": "unhealthy"}),
    make_agent("h1", "remote", "worker.example.com", 7000, ["far"], zone="z1"),
]


def catalog_of(agents: list[Agent], revision: int = REVISION) -> Catalog:
    catalog = Catalog()
    catalog.apply([Reset(revision, {f"/services/{a.name}/{a.id}": a for a in agents})])
    return catalog


@pytest.fixture
def snapshot() -> Snapshot:
    return catalog_of(AGENTS).snapshot


class FakeUpstream:
    """A resolver on 127.0.0.1 (UDP and TCP, one port) whose behaviour a test sets.

    ``mode``: "answer" (A 192.0.2.1 for every name), "truncate" (TC over UDP, the full answer over
    TCP), "servfail", "refused", "silent" (never answers), "spoof" (a wrong ID first, then the answer).
    """

    def __init__(self, mode: str = "answer") -> None:
        self.mode = mode
        self.udp_queries = 0
        self.udp_sources: set[Any] = set()  # (host, port) the UDP queries came from
        self.tcp_queries = 0
        self.port = 0
        self._udp: Any = None
        self._tcp: Any = None
        self._writers: set[Any] = set()

    def respond(self, data: bytes, tcp: bool) -> list[bytes]:
        from dnslib import RR, A, DNSRecord

        request = DNSRecord.parse(data)
        reply = request.reply()
        if self.mode == "servfail":
            reply.header.rcode = 2
        elif self.mode == "refused":
            reply.header.rcode = 5
        elif self.mode == "truncate" and not tcp:
            reply.header.tc = 1
        else:
            count = 40 if self.mode == "truncate" else 1
            for i in range(count):
                reply.add_answer(RR(request.q.qname, rdata=A(f"192.0.2.{i + 1}"), ttl=60))
        packed = bytes(reply.pack())
        if self.mode == "spoof":
            return [bytes([packed[0] ^ 0xFF]) + packed[1:], packed]
        return [packed]

    async def start(self) -> FakeUpstream:
        import asyncio

        loop = asyncio.get_running_loop()
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                upstream.udp_queries += 1
                upstream.udp_sources.add(addr)
                if upstream.mode != "silent":
                    for packet in upstream.respond(data, False):
                        self.transport.sendto(packet, addr)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream._writers.add(writer)
            try:
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                    upstream.tcp_queries += 1
                    if upstream.mode == "silent":
                        continue
                    for packet in upstream.respond(data, True):
                        writer.write(len(packet).to_bytes(2, "big") + packet)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                upstream._writers.discard(writer)
                writer.close()

        # The UDP port chosen by the kernel may be taken for TCP (by another process's connection).
        attempts = 20
        while True:
            self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
            self.port = self._udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(tcp, "127.0.0.1", self.port)
                return self
            except OSError as exc:
                self._udp.close()
                attempts -= 1
                if exc.errno != errno.EADDRINUSE or not attempts:
                    raise

    async def stop(self) -> None:
        self._udp.close()
        self._tcp.close()
        for writer in list(self._writers):
            writer.close()
        await self._tcp.wait_closed()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"
