"""Table tests of the pure resolver, CoreDNS style: question -> expected answer text."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import pytest
from dnslib import QTYPE, RCODE

from sidecar.catalog import Snapshot
from sidecar.dns.resolver import Answer, Zone, resolve, weighted_shuffle

from .conftest import make_agent

ZONE = Zone(local_zone="z1")
SOA = "agents.local. 5 IN SOA ns.dns.agents.local. hostmaster.agents.local. 42 3600 600 86400 5"
SOA_ANSWER = SOA


def text(answer: Answer) -> str:
    """The answer as lines: rcode, then each section's records in zone-file form."""
    lines = [RCODE.get(answer.rcode)]
    for section, records in (("an", answer.answer), ("ns", answer.authority), ("ar", answer.additional)):
        lines += [f"{section} " + " ".join(rr.toZone().split()) for rr in records]
    return "\n".join(lines)


def ask(snapshot: Snapshot, name: str, qtype: str, zone: Zone = ZONE, seed: int = 0) -> str:
    labels = tuple(name.lower().rstrip(".").encode().split(b".")) if name.strip(".") else ()
    answer = resolve(snapshot, zone, labels, getattr(QTYPE, qtype), random.Random(seed))
    return "FORWARD" if answer is None else text(answer)


CASES = [
    # Capabilities: healthy agents, same zone first.
    ("chat.agents.local", "A", """NOERROR
an chat.agents.local. 5 IN A 10.0.0.1
an chat.agents.local. 5 IN A 10.0.0.2"""),
    ("chat.agents.local", "SRV", """NOERROR
an chat.agents.local. 5 IN SRV 0 100 8001 a1.id.agents.local.
an chat.agents.local. 5 IN SRV 10 50 8002 a2.id.agents.local.
ar a1.id.agents.local. 5 IN A 10.0.0.1
ar a2.id.agents.local. 5 IN A 10.0.0.2"""),
    ("_chat._tcp.agents.local", "SRV", """NOERROR
an _chat._tcp.agents.local. 5 IN SRV 0 100 8001 a1.id.agents.local.
an _chat._tcp.agents.local. 5 IN SRV 10 50 8002 a2.id.agents.local.
ar a1.id.agents.local. 5 IN A 10.0.0.1
ar a2.id.agents.local. 5 IN A 10.0.0.2"""),
    ("_chat._tcp.agents.local", "A", f"NOERROR\nns {SOA}"),
    ("_nope._tcp.agents.local", "SRV", f"NXDOMAIN\nns {SOA}"),
    # AAAA of IPv4-only agents is NODATA, never NXDOMAIN.
    ("chat.agents.local", "AAAA", f"NOERROR\nns {SOA}"),
    ("chat.agents.local", "TXT", f"NOERROR\nns {SOA}"),
    ("vision.agents.local", "AAAA", "NOERROR\nan vision.agents.local. 5 IN AAAA 2001:db8::1"),
    ("vision.agents.local", "A", f"NOERROR\nns {SOA}"),
    ("vision.agents.local", "SRV", """NOERROR
an vision.agents.local. 5 IN SRV 0 100 9000 b1.id.agents.local.
ar b1.id.agents.local. 5 IN AAAA 2001:db8::1"""),
    # Tags narrow a capability.
    ("gpu.chat.agents.local", "A", "NOERROR\nan gpu.chat.agents.local. 5 IN A 10.0.0.1"),
    ("cpu.chat.agents.local", "A", f"NXDOMAIN\nns {SOA}"),
    ("gpu.search.agents.local", "A", "NOERROR\nan gpu.search.agents.local. 5 IN A 10.0.0.1"),
    # Service names.
    ("alpha.service.agents.local", "A", """NOERROR
an alpha.service.agents.local. 5 IN A 10.0.0.1
an alpha.service.agents.local. 5 IN A 10.0.0.2"""),
    ("alpha.service.agents.local", "SRV", """NOERROR
an alpha.service.agents.local. 5 IN SRV 0 100 8001 a1.id.agents.local.
an alpha.service.agents.local. 5 IN SRV 10 50 8002 a2.id.agents.local.
ar a1.id.agents.local. 5 IN A 10.0.0.1
ar a2.id.agents.local. 5 IN A 10.0.0.2"""),
    ("nobody.service.agents.local", "A", f"NXDOMAIN\nns {SOA}"),
    # Ids: addresses and TXT.
    ("a2.id.agents.local", "A", "NOERROR\nan a2.id.agents.local. 5 IN A 10.0.0.2"),
    ("a1.id.agents.local", "TXT", "NOERROR\nan a1.id.agents.local. 5 IN TXT \"name=alpha\" \"version=1.2\" "
     "\"protocol=http\" \"capabilities=chat,search\" \"tags=gpu\" \"model=x\" \"team=ml\""),
    ("a1.id.agents.local", "SRV", f"NOERROR\nns {SOA}"),
    ("zz.id.agents.local", "A", f"NXDOMAIN\nns {SOA}"),
    # Unhealthy agents are not served, but their names exist: NODATA.
    ("dead.agents.local", "A", f"NOERROR\nns {SOA}"),
    ("d1.id.agents.local", "A", f"NOERROR\nns {SOA}"),
    ("d1.id.agents.local", "TXT", f"NOERROR\nns {SOA}"),
    ("gamma.service.agents.local", "SRV", f"NOERROR\nns {SOA}"),
    # An agent registered with a host name: SRV targets the host name, no A/AAAA of ours.
    ("far.agents.local", "SRV", "NOERROR\nan far.agents.local. 5 IN SRV 0 100 7000 worker.example.com."),
    ("far.agents.local", "A", f"NOERROR\nns {SOA}"),
    # DNS-SD browsing: capabilities with a healthy agent.
    ("_services._dns-sd._udp.agents.local", "PTR", """NOERROR
an _services._dns-sd._udp.agents.local. 5 IN PTR _chat._tcp.agents.local.
an _services._dns-sd._udp.agents.local. 5 IN PTR _far._tcp.agents.local.
an _services._dns-sd._udp.agents.local. 5 IN PTR _search._tcp.agents.local.
an _services._dns-sd._udp.agents.local. 5 IN PTR _vision._tcp.agents.local."""),
    ("_services._dns-sd._udp.agents.local", "A", f"NOERROR\nns {SOA}"),
    # The apex: SOA (serial = revision) and NS.
    ("agents.local", "SOA", f"NOERROR\nan {SOA_ANSWER}"),
    ("agents.local", "NS", "NOERROR\nan agents.local. 5 IN NS ns.dns.agents.local."),
    ("agents.local", "A", f"NOERROR\nns {SOA}"),
    # Empty non-terminals exist (RFC 8020): NODATA, not NXDOMAIN.
    ("id.agents.local", "A", f"NOERROR\nns {SOA}"),
    ("service.agents.local", "A", f"NOERROR\nns {SOA}"),
    ("_tcp.agents.local", "SRV", f"NOERROR\nns {SOA}"),
    # Unknown names.
    ("nope.agents.local", "A", f"NXDOMAIN\nns {SOA}"),
    ("a.b.chat.agents.local", "A", f"NXDOMAIN\nns {SOA}"),
    ("ch_at.agents.local", "A", f"NXDOMAIN\nns {SOA}"),
    # ANY is answered minimally (RFC 8482): one RRset.
    ("chat.agents.local", "ANY", """NOERROR
an chat.agents.local. 5 IN A 10.0.0.1
an chat.agents.local. 5 IN A 10.0.0.2"""),
    ("vision.agents.local", "ANY", "NOERROR\nan vision.agents.local. 5 IN AAAA 2001:db8::1"),
    ("agents.local", "ANY", f"NOERROR\nan {SOA_ANSWER}"),
    # Outside the zone: for the forwarder (never in-zone names).
    ("example.com", "A", "FORWARD"),
    ("agents.local.example.com", "A", "FORWARD"),
    ("xagents.local", "A", "FORWARD"),
    ("local", "SOA", "FORWARD"),
]


@pytest.mark.parametrize(("name", "qtype", "expected"), CASES, ids=[f"{n}/{t}" for n, t, _ in CASES])
def test_table(snapshot: Snapshot, name: str, qtype: str, expected: str) -> None:
    assert ask(snapshot, name, qtype) == expected


def test_case_insensitive_labels(snapshot: Snapshot) -> None:
    assert ask(snapshot, "CHAT.Agents.LOCAL", "A") == ask(snapshot, "chat.agents.local", "A")


def test_other_domain_and_ttls(snapshot: Snapshot) -> None:
    zone = Zone(domain="Mesh.Internal.", ttl=30, negative_ttl=7, local_zone="z1")
    assert ask(snapshot, "a2.id.mesh.internal", "A", zone) == "NOERROR\nan a2.id.mesh.internal. 30 IN A 10.0.0.2"
    assert ask(snapshot, "nope.mesh.internal", "A", zone) == (
        "NXDOMAIN\nns mesh.internal. 7 IN SOA ns.dns.mesh.internal. hostmaster.mesh.internal. 42 3600 600 86400 7")
    assert ask(snapshot, "chat.agents.local", "A", zone) == "FORWARD"


def test_proxy_mode_answers_the_proxy_address(snapshot: Snapshot) -> None:
    zone = Zone(local_zone="z1", proxy_address=ipaddress.ip_address("127.0.0.1"))
    assert ask(snapshot, "chat.agents.local", "A", zone) == "NOERROR\nan chat.agents.local. 5 IN A 127.0.0.1"
    assert ask(snapshot, "dead.agents.local", "A", zone) == f"NOERROR\nns {SOA}"


def test_ns_glue_when_listening_on_an_address(snapshot: Snapshot) -> None:
    zone = Zone(local_zone="z1", ns_address=ipaddress.ip_address("127.0.0.1"))
    assert ask(snapshot, "agents.local", "NS", zone) == (
        "NOERROR\nan agents.local. 5 IN NS ns.dns.agents.local.\nar ns.dns.agents.local. 5 IN A 127.0.0.1")
    assert ask(snapshot, "ns.dns.agents.local", "A", zone) == "NOERROR\nan ns.dns.agents.local. 5 IN A 127.0.0.1"


def test_no_local_zone_means_agents_without_zone_come_first() -> None:
    from .conftest import catalog_of

    snapshot = catalog_of([make_agent("x", "x", "10.1.0.1", 1, ["c"]), make_agent("y", "y", "10.1.0.2", 2, ["c"],
                                                                                  zone="far")]).snapshot
    assert ask(snapshot, "c.agents.local", "SRV", Zone()).splitlines()[1:3] == [
        "an c.agents.local. 5 IN SRV 0 100 1 x.id.agents.local.",
        "an c.agents.local. 5 IN SRV 10 100 2 y.id.agents.local.",
    ]


def test_txt_strings_are_capped() -> None:
    from .conftest import catalog_of

    metadata = {f"k{i:02}": "v" * 300 for i in range(10)}
    snapshot = catalog_of([make_agent("big", "big", "10.0.0.1", 1, ["c"], metadata=metadata)]).snapshot
    answer = resolve(snapshot, ZONE, (b"big", b"id", b"agents", b"local"), QTYPE.TXT, random.Random(0))
    assert answer is not None
    strings = answer.answer[0].rdata.data
    assert all(len(s) <= 255 for s in strings)
    assert sum(len(s) + 1 for s in strings) <= 1000
    assert strings[:2] == [b"name=big", b"version="]
    assert strings[5].startswith(b"k00=vvv")


def test_weighted_order_follows_weights() -> None:
    """RFC 2782: the first record is drawn in proportion to weight (fixed seeds, so not a flaky test)."""
    agents = [make_agent(f"w{w}", "w", "10.2.0.1", 1, ["c"], weight=w) for w in (300, 100, 0)]
    firsts = Counter(weighted_shuffle(agents, random.Random(seed))[0].weight for seed in range(4000))
    assert 2700 < firsts[300] < 3300
    assert 700 < firsts[100] < 1300
    assert firsts[0] < 40
    orders = {tuple(a.weight for a in weighted_shuffle(agents, random.Random(seed))) for seed in range(200)}
    assert all(sorted(order) == [0, 100, 300] for order in orders) and len(orders) > 2


def test_shuffled_flag_and_priority_groups() -> None:
    from .conftest import catalog_of

    agents = [make_agent(f"s{i}", "s", f"10.3.0.{i}", 1, ["c"], zone="z1" if i < 3 else "z2") for i in range(5)]
    snapshot = catalog_of(agents).snapshot
    seen = set()
    for seed in range(50):
        answer = resolve(snapshot, ZONE, (b"c", b"agents", b"local"), QTYPE.SRV, random.Random(seed))
        assert answer is not None and answer.shuffled
        priorities = [rr.rdata.priority for rr in answer.answer]
        assert priorities == [0, 0, 0, 10, 10]
        seen.add(tuple(str(rr.rdata.target) for rr in answer.answer))
    assert len(seen) > 1
    single = resolve(snapshot, ZONE, (b"s0", b"id", b"agents", b"local"), QTYPE.A, random.Random(0))
    assert single is not None and not single.shuffled
