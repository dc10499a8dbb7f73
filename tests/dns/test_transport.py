"""DnsServer on real loopback sockets with a catalog filled by hand, queried with dnspython."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import pytest_asyncio

from sidecar.catalog import Catalog, Upsert
from sidecar.config import DnsSettings
from sidecar.dns.server import DnsServer
from sidecar.metrics import Metrics

from .conftest import AGENTS, FakeUpstream, catalog_of, make_agent

pytestmark = pytest.mark.asyncio

MakeDns = Callable[..., Coroutine[Any, Any, DnsServer]]


@pytest_asyncio.fixture
async def make_dns() -> AsyncIterator[MakeDns]:
    servers: list[DnsServer] = []

    async def make(catalog: Catalog | None = None, **settings: Any) -> DnsServer:
        settings.setdefault("listen", "127.0.0.1:0")
        settings.setdefault("upstreams", ("none",))
        server = DnsServer(DnsSettings(**settings), catalog or catalog_of(AGENTS), Metrics().dns, local_zone="z1")
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


async def udp(server: DnsServer, name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=server.port, timeout=5, ignore_unexpected=False)


async def tcp(server: DnsServer, name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    return await dns.asyncquery.tcp(query, "127.0.0.1", port=server.port, timeout=5)


def addresses(response: dns.message.Message) -> list[str]:
    return [rr.to_text() for rrset in response.answer for rr in rrset]


async def test_udp_and_tcp_answer_on_one_port(make_dns: MakeDns) -> None:
    server = await make_dns()
    assert server.port != 0
    for ask in (udp, tcp):
        response = await ask(server, "chat.agents.local")
        assert response.rcode() == dns.rcode.NOERROR and response.flags & dns.flags.AA
        assert addresses(response) == ["10.0.0.1", "10.0.0.2"]


async def test_case_is_echoed(make_dns: MakeDns) -> None:
    server = await make_dns()
    for _ in range(2):  # general path, then cache
        query = dns.message.make_query("ChAt.AgEnTs.LoCaL", "A")
        raw = await dns.asyncquery.udp(query, "127.0.0.1", port=server.port, timeout=5, one_rr_per_rrset=True)
        assert raw.question[0].name.to_text() == "ChAt.AgEnTs.LoCaL."


async def test_tc_over_udp_full_answer_over_tcp_with_60_agents(make_dns: MakeDns) -> None:
    agents = [make_agent(f"g{i}", "many", f"10.9.0.{i + 1}", 9000 + i, ["many"]) for i in range(60)]
    server = await make_dns(catalog_of(agents))
    truncated = await udp(server, "many.agents.local", "SRV")
    assert truncated.flags & dns.flags.TC and not truncated.answer
    full = await tcp(server, "many.agents.local", "SRV")
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == 60 and len(full.additional) == 60
    edns = await udp(server, "many.agents.local", "SRV", use_edns=0, payload=4096)
    assert not edns.flags & dns.flags.TC and len(edns.answer[0]) == 60
    assert edns.edns == 0 and edns.payload == 4096
    small = await udp(server, "many.agents.local", "A", use_edns=0, payload=1232)
    assert not small.flags & dns.flags.TC and len(small.answer[0]) == 60


async def test_several_queries_per_tcp_connection(make_dns: MakeDns) -> None:
    server = await make_dns()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    names = ["chat.agents.local", "nope.agents.local", "a1.id.agents.local", "agents.local"]
    queries = [dns.message.make_query(n, "A") for n in names]
    # All in one write, so the server must split the stream itself.
    writer.write(b"".join(len(w).to_bytes(2, "big") + w for w in (q.to_wire() for q in queries)))
    await writer.drain()
    replies = {}
    for _ in queries:
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 10), "big")
        response = dns.message.from_wire(await reader.readexactly(size))
        replies[response.id] = response
    assert [replies[q.id].rcode() for q in queries] == [0, 3, 0, 0]
    writer.close()
    await writer.wait_closed()


async def test_idle_tcp_connections_are_closed(make_dns: MakeDns) -> None:
    server = await make_dns(tcp_idle_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    # The server closes an idle connection: EOF, not data. The bound is generous on purpose.
    assert await asyncio.wait_for(reader.read(), 20) == b""
    writer.close()


async def test_propagation_of_a_new_snapshot(make_dns: MakeDns) -> None:
    catalog = catalog_of(AGENTS)
    server = await make_dns(catalog)
    assert (await udp(server, "new.agents.local")).rcode() == dns.rcode.NXDOMAIN
    catalog.apply([Upsert("/services/n/n1", make_agent("n1", "n", "10.7.0.1", 1, ["new"]), 77)])
    response = await udp(server, "new.agents.local")
    assert addresses(response) == ["10.7.0.1"]
    soa = await udp(server, "agents.local", "SOA")
    assert soa.answer[0][0].serial == 77
    catalog.apply([Upsert("/services/n/n1", make_agent("n1", "n", "10.7.0.1", 1, ["new"],
                                                      health={"status": "unhealthy"}), 78)])
    nodata = await udp(server, "new.agents.local")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.authority


async def test_garbage_does_not_stop_the_server(make_dns: MakeDns) -> None:
    server = await make_dns()
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            received.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", server.port))
    try:
        # Too short (dropped), a query header with garbage (FORMERR), a response header (dropped).
        for junk in (b"", b"\x00", b"\xff" * 11, b"\x12\x34\x01\x00" + b"\xff" * 40, b"\x12\x35\x81\x00" + b"\xff"):
            transport.sendto(junk)
        reply = await asyncio.wait_for(received.get(), 10)
        assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == dns.rcode.FORMERR
    finally:
        transport.close()
    assert (await udp(server, "chat.agents.local")).rcode() == dns.rcode.NOERROR


async def test_forwarding_and_refusal(make_dns: MakeDns) -> None:
    fake = await FakeUpstream("answer").start()
    try:
        forwarding = await make_dns(upstreams=(fake.address,))
        response = await udp(forwarding, "example.org")
        assert addresses(response) == ["192.0.2.1"] and response.flags & dns.flags.RA
        assert addresses(await tcp(forwarding, "example.net")) == ["192.0.2.1"]  # not the cached name
        # In-zone names never go upstream, even unknown ones.
        before = fake.udp_queries
        assert (await udp(forwarding, "unknown.agents.local")).rcode() == dns.rcode.NXDOMAIN
        assert fake.udp_queries == before
        refusing = await make_dns()
        assert (await udp(refusing, "example.org")).rcode() == dns.rcode.REFUSED
    finally:
        await fake.stop()


async def test_a_second_identical_question_is_answered_from_the_cache(make_dns: MakeDns) -> None:
    fake = await FakeUpstream("answer").start()
    try:
        server = await make_dns(upstreams=(fake.address,))
        first = await udp(server, "example.org")
        second = await udp(server, "ExAmple.ORG")
        assert fake.udp_queries == 1
        assert addresses(second) == addresses(first) == ["192.0.2.1"]
        assert second.question[0].name.to_text() == "ExAmple.ORG."
        assert addresses(await tcp(server, "example.org")) == ["192.0.2.1"] and fake.tcp_queries == 0
        assert (server.metrics.forward_cache_hits, server.metrics.forward_cache_misses) == (2, 1)
        uncached = await make_dns(upstreams=(fake.address,), cache_size=0)
        for _ in range(2):
            assert addresses(await udp(uncached, "example.org")) == ["192.0.2.1"]
        assert fake.udp_queries == 3
    finally:
        await fake.stop()


async def test_forwarding_failure_is_servfail(make_dns: MakeDns) -> None:
    fake = await FakeUpstream("silent").start()
    try:
        server = await make_dns(upstreams=(fake.address,), upstream_timeout=0.2)
        assert (await udp(server, "example.org")).rcode() == dns.rcode.SERVFAIL
    finally:
        await fake.stop()


async def test_metrics_count_queries_and_hits(make_dns: MakeDns) -> None:
    server = await make_dns()
    query = dns.message.make_query("chat.agents.local", "A")
    query.id = 0x0101  # the same message three times: general path, normalised cache, exact cache
    for _ in range(3):
        await dns.asyncquery.udp(query, "127.0.0.1", port=server.port, timeout=5)
    await udp(server, "nope.agents.local")
    metrics = server.metrics
    assert metrics.query_totals() == {("A", "NOERROR"): 3, ("A", "NXDOMAIN"): 1}
    assert (metrics.cache_misses, metrics.cache_hits, sum(metrics.exact_hits)) == (2, 1, 1)
    scraped = {(family.name, tuple(sample.labels.values())): sample.value
               for family in metrics.collect() for sample in family.samples}  # type: ignore[attr-defined]
    assert scraped[("sidecar_dns_queries", ("A", "NOERROR"))] == 3
    assert scraped[("sidecar_dns_cache_hits", ())] == 2
