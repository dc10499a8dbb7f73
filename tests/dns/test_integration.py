"""The DNS of a whole sidecar on a real etcd, queried with dnspython: the DESIGN.md DNS table, row by row."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import pytest

from sidecar.model import Agent
from sidecar.server import Server

from ..waiting import eventually
from .conftest import FakeUpstream, make_agent

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]


async def put(server: Server, *agents: Agent) -> None:
    prefix = server.settings.etcd.prefix
    for agent in agents:
        await server.etcd.put(agent.key(prefix), agent.to_bytes())


async def ask(server: Server, name: str, rdtype: str = "A", *, tcp: bool = False, **kw: Any) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    if tcp:
        return await dns.asyncquery.tcp(query, "127.0.0.1", port=server.dns.port, timeout=5)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=server.dns.port, timeout=5)


def records(response: dns.message.Message, section: str = "answer") -> list[str]:
    return sorted(f"{rrset.name} {rr.to_text()}" for rrset in getattr(response, section) for rr in rrset)


AGENTS = [
    make_agent("a1", "alpha", "127.0.0.11", 8001, ["chat", "search"], tags=["gpu"], zone="z1", version="1.2",
               metadata={"team": "ml"}),
    make_agent("a2", "alpha", "127.0.0.12", 8002, ["chat"], zone="z2", weight=50),
    make_agent("b1", "beta", "::1", 9000, ["vision"], zone="z1"),
    make_agent("d1", "gamma", "127.0.0.19", 9100, ["dead"], health={"status": "unhealthy"}),
]


async def started(make_server: Callable[..., Any], **sections: Any) -> Server:
    server: Server = await make_server(agent={"zone": "z1"}, **sections)
    await put(server, *AGENTS)
    await eventually(lambda: len(server.catalog.snapshot.agents) == len(AGENTS), what="agents to sync")
    return server


async def test_design_table(make_server: Callable[..., Any]) -> None:
    fake = await FakeUpstream("answer").start()
    try:
        server = await started(make_server, dns={"upstreams": [fake.address]})
        revision = server.catalog.snapshot.revision
        # <cap>.<zone> A/AAAA: healthy agents with the capability.
        assert records(await ask(server, "chat.agents.local")) == [
            "chat.agents.local. 127.0.0.11", "chat.agents.local. 127.0.0.12"]
        assert records(await ask(server, "vision.agents.local", "AAAA")) == ["vision.agents.local. ::1"]
        # <tag>.<cap>.<zone>.
        assert records(await ask(server, "gpu.chat.agents.local")) == ["gpu.chat.agents.local. 127.0.0.11"]
        # SRV at <cap> and _<cap>._tcp: priority by zone, weight, port, target with glue.
        for name in ("chat.agents.local", "_chat._tcp.agents.local"):
            srv = await ask(server, name, "SRV")
            assert [rr.to_text() for rr in srv.answer[0]] == [
                "0 100 8001 a1.id.agents.local.", "10 50 8002 a2.id.agents.local."]
            assert records(srv, "additional") == ["a1.id.agents.local. 127.0.0.11", "a2.id.agents.local. 127.0.0.12"]
        # <name>.service.<zone> A/AAAA/SRV.
        assert len(records(await ask(server, "alpha.service.agents.local"))) == 2
        assert records(await ask(server, "beta.service.agents.local", "AAAA")) == ["beta.service.agents.local. ::1"]
        assert len((await ask(server, "alpha.service.agents.local", "SRV")).answer[0]) == 2
        # <id>.id.<zone> A/AAAA and TXT.
        assert records(await ask(server, "a2.id.agents.local")) == ["a2.id.agents.local. 127.0.0.12"]
        assert records(await ask(server, "b1.id.agents.local", "AAAA")) == ["b1.id.agents.local. ::1"]
        assert records(await ask(server, "a1.id.agents.local", "TXT")) == [
            'a1.id.agents.local. "name=alpha" "version=1.2" "protocol=http" "capabilities=chat,search" '
            '"tags=gpu" "team=ml"']
        # DNS-SD browsing.
        assert records(await ask(server, "_services._dns-sd._udp.agents.local", "PTR")) == [
            f"_services._dns-sd._udp.agents.local. _{c}._tcp.agents.local." for c in ("chat", "search", "vision")]
        # Unknown name: NXDOMAIN with the SOA (serial = revision, negative TTL = minimum = 5).
        nx = await ask(server, "nope.agents.local")
        assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA
        soa = nx.authority[0]
        assert soa[0].serial == revision and soa[0].minimum == 5 and soa.ttl == 5
        # Known names with no healthy agent, or no record of the type: NODATA with the SOA.
        for name, rdtype in (("dead.agents.local", "A"), ("chat.agents.local", "AAAA"),
                             ("d1.id.agents.local", "TXT")):
            nodata = await ask(server, name, rdtype)
            assert (nodata.rcode(), nodata.answer, len(nodata.authority)) == (dns.rcode.NOERROR, [], 1), name
        # NS and SOA at the apex.
        assert records(await ask(server, "agents.local", "NS")) == ["agents.local. ns.dns.agents.local."]
        assert (await ask(server, "agents.local", "SOA")).answer[0][0].serial == revision
        # Outside the zone: forwarded.
        assert records(await ask(server, "example.org")) == ["example.org. 192.0.2.1"]
    finally:
        await fake.stop()


async def test_forwarding_off_refuses(make_server: Callable[..., Any]) -> None:
    server = await started(make_server)
    assert (await ask(server, "example.org")).rcode() == dns.rcode.REFUSED


async def test_registration_health_and_deletion_propagate(make_server: Callable[..., Any]) -> None:
    server = await started(make_server)
    newcomer = make_agent("n1", "newcomer", "127.0.0.21", 7000, ["fresh"])
    assert (await ask(server, "fresh.agents.local")).rcode() == dns.rcode.NXDOMAIN
    await put(server, newcomer)
    await eventually(lambda: "fresh" in server.catalog.snapshot.by_capability, what="registration to sync")
    assert records(await ask(server, "fresh.agents.local")) == ["fresh.agents.local. 127.0.0.21"]
    await put(server, newcomer.with_status("unhealthy"))
    await eventually(lambda: not server.catalog.snapshot.by_capability["fresh"][0].healthy, what="health to sync")
    unhealthy = await ask(server, "fresh.agents.local")
    assert unhealthy.rcode() == dns.rcode.NOERROR and unhealthy.answer == []
    await server.etcd.delete(newcomer.key(server.settings.etcd.prefix))
    await eventually(lambda: "fresh" not in server.catalog.snapshot.by_capability, what="deletion to sync")
    assert (await ask(server, "fresh.agents.local")).rcode() == dns.rcode.NXDOMAIN


async def test_sixty_agents_truncate_over_udp_and_come_whole_over_tcp(make_server: Callable[..., Any]) -> None:
    server = await started(make_server)
    many = [make_agent(f"m{i}", "many", f"127.0.1.{i + 1}", 9000 + i, ["many"]) for i in range(60)]
    await put(server, *many)
    await eventually(lambda: len(server.catalog.snapshot.by_capability.get("many", ())) == 60, what="60 agents")
    udp = await ask(server, "many.agents.local", "SRV")
    assert udp.flags & dns.flags.TC and udp.answer == []
    tcp = await ask(server, "many.agents.local", "SRV", tcp=True)
    assert len(tcp.answer[0]) == 60 and len(tcp.additional) == 60  # one glue RRset per target
    for payload, truncated in ((512, True), (1232, True), (4096, False)):
        response = await ask(server, "many.agents.local", "SRV", use_edns=0, payload=payload)
        assert bool(response.flags & dns.flags.TC) == truncated, payload
        assert response.edns == 0 and response.payload == 4096
    a_records = await ask(server, "many.agents.local", "A", use_edns=0, payload=1232)
    assert len(a_records.answer[0]) == 60


async def test_case_is_echoed(make_server: Callable[..., Any]) -> None:
    server = await started(make_server)
    for _ in range(2):
        response = await ask(server, "cHAt.AGents.lOCal")
        assert response.question[0].name.to_text() == "cHAt.AGents.lOCal."
        assert len(response.answer[0]) == 2
