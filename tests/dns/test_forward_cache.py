"""The forward cache, without sockets and with a hand-turned clock: what is kept, for how long, and how it is served."""

from __future__ import annotations

from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, SOA, A, DNSRecord, EDNSOption

from sidecar.dns.answers import Answers, Forward
from sidecar.dns.forward_cache import NEGATIVE_MAX_TTL, ForwardCache, cacheable
from sidecar.metrics import DnsMetrics, Metrics

from .conftest import AGENTS, catalog_of
from .test_answers import ZONE, query

MAX_TTL = 300


class Clock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def upstream_reply(data: bytes, *, rcode: int = RCODE.NOERROR, ttls: tuple[int, ...] = (60,),
                   soa: tuple[int, int] | None = None, tc: bool = False, options: bool = False) -> bytes:
    """What an upstream would answer to ``data``: A records with ``ttls``, a SOA (TTL, minimum) in authority."""
    request = DNSRecord.parse(data)
    reply = request.reply()
    reply.header.rcode = rcode
    reply.header.tc = int(tc)
    for i, ttl in enumerate(ttls):
        reply.add_answer(RR(request.q.qname, rdata=A(f"192.0.2.{i + 1}"), ttl=ttl))
    if soa is not None:
        ttl, minimum = soa
        reply.add_auth(RR("example.com", QTYPE.SOA, ttl=ttl,
                          rdata=SOA("ns.example.com", "hostmaster.example.com", (1, 3600, 600, 86400, minimum))))
    opts = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
    if opts or options:
        do = bool(opts and opts[0].edns_do)
        cookie = [EDNSOption(10, b"12345678")] if options else []
        reply.add_ar(EDNS0(udp_len=1232, flags="do" if do else "", opts=cookie))
    return bytes(reply.pack())


Q = query("example.com", qid=0x1111)


@pytest.mark.parametrize(("case", "response", "lifetime"), [
    ("positive: smallest TTL", upstream_reply(Q, ttls=(60, 40)), 40),
    ("positive: capped", upstream_reply(Q, ttls=(86400,)), MAX_TTL),
    ("positive: TTL 0 is not kept", upstream_reply(Q, ttls=(0,)), None),
    ("positive: top bit set means 0", upstream_reply(Q, ttls=(1 << 31,)), None),
    ("NXDOMAIN: SOA minimum", upstream_reply(Q, rcode=RCODE.NXDOMAIN, ttls=(), soa=(100, 20)), 20),
    ("NXDOMAIN: SOA TTL", upstream_reply(Q, rcode=RCODE.NXDOMAIN, ttls=(), soa=(15, 20)), 15),
    ("NXDOMAIN: capped", upstream_reply(Q, rcode=RCODE.NXDOMAIN, ttls=(), soa=(3600, 3600)), NEGATIVE_MAX_TTL),
    ("NODATA: SOA minimum", upstream_reply(Q, ttls=(), soa=(3600, 7)), 7),
    ("NXDOMAIN without SOA", upstream_reply(Q, rcode=RCODE.NXDOMAIN, ttls=()), None),
    ("NODATA without SOA", upstream_reply(Q, ttls=()), None),
    ("SERVFAIL", upstream_reply(Q, rcode=RCODE.SERVFAIL, ttls=()), None),
    ("REFUSED", upstream_reply(Q, rcode=RCODE.REFUSED, ttls=()), None),
    ("FORMERR", upstream_reply(Q, rcode=RCODE.FORMERR, ttls=()), None),
    ("TC", upstream_reply(Q, tc=True), None),
    ("OPT without options", upstream_reply(query("example.com", edns=1232), ttls=(60,)), 60),
    ("OPT with a cookie", upstream_reply(Q, options=True), None),
    ("cut short", upstream_reply(Q)[:-2], None),
    ("trailing bytes", upstream_reply(Q) + b"\x00", None),
])
def test_what_is_kept_and_for_how_long(case: str, response: bytes, lifetime: int | None) -> None:
    layout = cacheable(response, MAX_TTL)
    assert (layout and layout[0]) == lifetime, case


def test_opt_flags_are_not_taken_for_a_ttl() -> None:
    response = upstream_reply(query("example.com", edns=1232, do=True), ttls=(60,))
    layout = cacheable(response, MAX_TTL)
    assert layout is not None and len(layout[1]) == 1  # the A record's TTL, not the OPT's flags


def make(size: int = 100) -> tuple[Answers, Clock, DnsMetrics]:
    clock = Clock()
    metrics = Metrics().dns
    answers = Answers(ZONE, catalog_of(AGENTS).snapshot, metrics, forward_cache=ForwardCache(size, MAX_TTL, clock))
    return answers, clock, metrics


def forward_once(answers: Answers, data: bytes, **response: Any) -> bytes:
    """Ask ``answers`` for ``data``, which must go upstream, and give it the upstream's reply."""
    forward = answers.fast(data) or answers.answer(data)
    assert isinstance(forward, Forward), forward
    return answers.forwarded(forward, upstream_reply(data, **response))


def from_cache(answers: Answers, data: bytes, tcp: bool = False) -> DNSRecord | None:
    """The reply from the cache (fast path first, as the transport does), or None when it goes upstream."""
    raw = answers.fast(data, tcp) or answers.answer(data, tcp)
    return DNSRecord.parse(raw) if isinstance(raw, bytes) else None


def ttls(record: DNSRecord) -> list[int]:
    return [rr.ttl for rr in (*record.rr, *record.auth)]


def test_ttls_count_down_and_the_entry_expires() -> None:
    answers, clock, metrics = make()
    forward_once(answers, Q, ttls=(60, 90))
    for elapsed, expected in ((0, [60, 60]), (0.9, [60, 60]), (1, [59, 59]), (59.5, [1, 1])):
        clock.now = 1000.0 + elapsed
        record = from_cache(answers, Q)
        assert record is not None and ttls(record) == expected, elapsed
    clock.now = 1060.0
    assert from_cache(answers, Q) is None
    assert (metrics.forward_cache_hits, metrics.forward_cache_misses) == (4, 2)


def test_negative_answers_are_kept_per_rfc_2308() -> None:
    answers, clock, _ = make()
    forward_once(answers, Q, rcode=RCODE.NXDOMAIN, ttls=(), soa=(3600, 10))
    clock.now += 3
    record = from_cache(answers, Q)
    assert record is not None and record.header.rcode == RCODE.NXDOMAIN and ttls(record) == [7]
    clock.now += 7
    assert from_cache(answers, Q) is None


def test_id_and_question_case_are_the_query_s() -> None:
    answers, _, _ = make()
    forward_once(answers, query("example.com", qid=0x1111))
    for path in ("fast", "slow"):
        data = query("ExAmPlE.CoM", qid=0xBEEF)
        raw = answers.fast(data) if path == "fast" else answers.answer(data)
        assert isinstance(raw, bytes), path
        record = DNSRecord.parse(raw)
        assert record.header.id == 0xBEEF and str(record.q.qname) == "ExAmPlE.CoM.", path
        assert str(record.rr[0].rname) == "ExAmPlE.CoM.", path  # compressed against the question
        assert [str(rr.rdata) for rr in record.rr] == ["192.0.2.1"], path
    # Both paths give the same bytes.
    data = query("exAMPLE.com", qid=0x0102)
    assert answers.fast(data) == answers.answer(data)


@pytest.mark.parametrize(("stored", "asked"), [
    ({"edns": 1232}, {"edns": 1232, "do": True}),
    ({"edns": 1232, "do": True}, {"edns": 1232}),
    ({}, {"edns": 1232}),
    ({"edns": 1232}, {}),
    ({"cd": 0}, {"cd": 1}),
    ({"rd": 1}, {"rd": 0}),
    ({}, {"qtype": "AAAA"}),
    ({}, {"qclass": 3}),
])
def test_questions_that_differ_do_not_share_an_entry(stored: dict[str, Any], asked: dict[str, Any]) -> None:
    answers, _, _ = make()
    forward_once(answers, query("example.com", **stored))
    assert from_cache(answers, query("example.com", **stored)) is not None
    assert from_cache(answers, query("example.com", **asked)) is None


def test_do_answers_keep_their_opt() -> None:
    answers, _, _ = make()
    data = query("example.com", edns=1232, do=True)
    forward_once(answers, data)
    record = from_cache(answers, query("example.com", edns=1232, do=True, qid=7))
    assert record is not None
    (opt,) = [rr for rr in record.ar if rr.rtype == QTYPE.OPT]
    assert opt.edns_do


@pytest.mark.parametrize("response", [
    {"rcode": RCODE.SERVFAIL, "ttls": ()},
    {"tc": True},
    {"options": True},
])
def test_servfail_tc_and_options_are_not_kept(response: dict[str, Any]) -> None:
    answers, _, _ = make()
    forward_once(answers, Q, **response)
    assert from_cache(answers, Q) is None


def test_no_response_gives_servfail_and_nothing_is_kept() -> None:
    answers, _, _ = make()
    forward = answers.answer(Q)
    assert isinstance(forward, Forward)
    assert DNSRecord.parse(answers.forwarded(forward, None)).header.rcode == RCODE.SERVFAIL
    assert from_cache(answers, Q) is None


def test_too_big_for_udp_is_truncated_and_whole_over_tcp() -> None:
    answers, _, _ = make()
    big = tuple(60 for _ in range(40))
    forward_once(answers, query("example.com", edns=4096), ttls=big)
    small = from_cache(answers, query("example.com", edns=512))  # a different key: EDNS on, same mark
    assert small is not None and small.header.tc == 1 and not small.rr
    whole = from_cache(answers, query("example.com", edns=512), tcp=True)
    assert whole is not None and whole.header.tc == 0 and len(whole.rr) == 40


def test_least_recently_used_goes_first() -> None:
    answers, _, _ = make(size=2)
    first, second, third = (query(f"host{i}.example.com") for i in range(3))
    forward_once(answers, first)
    forward_once(answers, second)
    assert from_cache(answers, first) is not None
    forward_once(answers, third)
    assert from_cache(answers, first) is not None and from_cache(answers, third) is not None
    assert from_cache(answers, second) is None


def test_in_zone_names_never_touch_it() -> None:
    answers, _, metrics = make()
    assert isinstance(from_cache(answers, query("chat.agents.local")), DNSRecord)
    assert (metrics.forward_cache_hits, metrics.forward_cache_misses) == (0, 0)
