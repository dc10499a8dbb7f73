"""DNS messages in and out: a precomputed wire-bytes cache in front of the general dnslib path.

The general (slow) path parses any message with dnslib, resolves it and packs
the reply with dnslib. Every in-zone reply it packs for a plain question is
kept in a cache keyed by (lower-cased qname, qtype, qclass, EDNS: none / on /
on with DO); the fast path recognises such a question with a few byte
comparisons and copies the cached reply, patching only the ID, the RD and CD
bits and the question's case (0x20). Both paths give the same bytes: the
cached reply is what the slow path packs, and the slow path restores the
question's case the same way.

In front of that, UDP queries seen before are answered from an exact-message
cache: the query's bytes after the ID (flags, question in its case, OPT) map
to the replies after the ID, one per weighted order, so a repeated query costs
one dict lookup and one concatenation, and is counted in a slot of
``DnsMetrics`` that is summed at scrape time. Its entries are made from the
replies the normalised fast path gives, so they are the same bytes.

A snapshot change drops both caches (every negative answer carries the
SOA serial, which is the revision), and entries are built again on demand.
A reply that does not fit the client's size is made by the slow path once:
first without the additional section, then with TC set and no records; both
are kept in the entry next to the full reply, so later queries with any size
limit are answered by the fast path from cached bytes (a TC reply is not put
in the exact cache, whose hits would not count the truncation).

Upstream responses to forwarded questions are kept in a ``ForwardCache``
(when one is given) under the same key plus the query's RD and CD bits; both
paths serve them with the query's ID and the question in its case.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from dnslib import CLASS, EDNS0, OPCODE, QTYPE, RCODE, RR, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from ..catalog import Snapshot
from ..metrics import DnsMetrics
from .forward_cache import ForwardCache
from .resolver import Answer, Zone, in_zone, resolve

UDP_PLAIN_LIMIT = 512
TCP_LIMIT = 65535
MAX_NAME = 255
# Orders kept per name with several weighted records; queries take them in turn.
VARIANTS = 16
CACHE_ENTRIES = 100_000
# Bytes of replies kept by the exact cache before it is emptied (clients that randomise the case
# make a new message per query).
EXACT_BYTES = 4 << 20

_OPT = QTYPE.OPT
_NO_EDNS, _EDNS, _EDNS_DO = 0, 1, 2
_EDNS_MARK = (b"\x00", b"\x01", b"\x02")
# Indexed by RD | CD << 1 of the query: the last byte of a forwarded question's cache key.
_FLAGS_MARK = (b"\x00", b"\x01", b"\x02", b"\x03")
# QDCOUNT=1, ANCOUNT=0, NSCOUNT=0 and the high byte of ARCOUNT, as a plain query has them.
_PLAIN_COUNTS = b"\x00\x01\x00\x00\x00\x00\x00"
_ZONE_CLASSES = (CLASS.IN, 255)  # IN and ANY
_ZONE_TRANSFERS = (QTYPE.AXFR, QTYPE.IXFR)


@dataclass(frozen=True, slots=True)
class Question:
    """One parsed query: what the reply depends on besides the snapshot."""

    id: bytes
    rd: int
    cd: int
    opcode: int
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    edns: int
    limit: int

    @property
    def key_labels(self) -> tuple[bytes, ...]:
        return tuple(part.lower() for part in self.labels)


@dataclass(frozen=True, slots=True)
class Forward:
    """A question outside the zone, to be sent upstream as received."""

    message: bytes
    question: Question


class _Variant:
    __slots__ = ("counts", "flags", "size", "tail")

    def __init__(self, reply: bytes, name_length: int) -> None:
        high, low = reply[2], reply[3]
        # Indexed by RD | CD << 1 of the query.
        self.flags = tuple(bytes((high | rd, low | cd << 4)) for cd in (0, 1) for rd in (0, 1))
        self.counts = reply[4:12]
        self.tail = reply[12 + name_length:]
        self.size = len(reply)


class _Entry:
    """The replies to one (name, qtype, qclass, EDNS) key: one per weighted order, and the fitted ones.

    ``bare`` holds, per order, the reply without its additional section (made when the full one did
    not fit a client; the full variant itself when there is no additional section), and ``truncated``
    the TC reply with no records (the same for every order): with those, a reply for any size limit
    is a choice among cached bytes.
    """

    __slots__ = ("bare", "mask", "rcode", "stat", "truncated", "variants")

    def __init__(self, count: int, stat: tuple[str, str], rcode: int) -> None:
        self.variants: list[_Variant | None] = [None] * count
        self.bare: list[_Variant | None] = [None] * count
        self.truncated: _Variant | None = None
        self.mask = count - 1
        self.stat = stat
        self.rcode = rcode

    def fitted(self, index: int, limit: int) -> _Variant | None:
        """The cached reply of order ``index`` for a client taking ``limit`` bytes (None: not made yet)."""
        variant = self.variants[index]
        if variant is None or variant.size <= limit:
            return variant
        bare = self.bare[index]
        if bare is None or bare.size <= limit:
            return bare
        return self.truncated


class _Exact:
    """The replies (after the ID) to one UDP query message, by weighted order, and its metrics slot."""

    __slots__ = ("mask", "replies", "slot")

    def __init__(self, count: int, slot: int) -> None:
        self.replies: list[bytes | None] = [None] * count
        self.mask = count - 1
        self.slot = slot


class Answers:
    """Replies for raw query messages: bytes to send, a Forward to do, or None to drop."""

    def __init__(self, zone: Zone, snapshot: Snapshot, metrics: DnsMetrics, *, forwarding: bool = True,
                 max_udp_payload: int = 4096, cache_entries: int = CACHE_ENTRIES,
                 forward_cache: ForwardCache | None = None) -> None:
        self.zone = zone
        self.forwarding = forwarding
        self.max_udp_payload = max_udp_payload
        self._snapshot = snapshot
        self._metrics = metrics
        self._queries = metrics.queries
        self._cache: dict[bytes, _Entry] = {}
        self._cache_entries = cache_entries
        self._exact: dict[bytes, _Exact] = {}
        self._exact_bytes = 0
        self._exact_hits = metrics.exact_hits
        self._forward_cache = forward_cache

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def update(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from now on; every cached reply is dropped."""
        self._snapshot = snapshot
        self._cache = {}
        self._exact, self._exact_bytes = {}, 0
        self._metrics.cache_invalidations += 1

    # The fast path --------------------------------------------------------------------------------

    def fast(self, data: bytes, tcp: bool = False) -> bytes | None:
        """The cached reply to a plain query, or None when the slow path must answer it."""
        if not tcp:
            exact = self._exact.get(data[2:])
            if exact is not None:
                # The ID's low byte picks the weighted order, as below.
                reply = exact.replies[data[1] & exact.mask]
                if reply is not None:
                    self._exact_hits[exact.slot] += 1
                    return data[:2] + reply
        # QR=0 and OPCODE=0; one question, no answer or authority records, at most one additional.
        if data[2:3] >= b"\x08" or data[4:11] != _PLAIN_COUNTS:
            return None
        try:
            end = 12
            length = data[12]
            while length:
                if length > 63:
                    return None
                end += length + 1
                length = data[end]
            end += 1
            question_end = end + 4
            additional = data[11]
            if additional == 0:
                if len(data) != question_end:
                    return None
                edns = _NO_EDNS
                limit = UDP_PLAIN_LIMIT
            elif additional == 1:
                # OPT at the root, EDNS version 0, extended rcode 0, options (ignored) exactly filling it.
                if (data[question_end:question_end + 3] != b"\x00\x00\x29" or data[question_end + 5:question_end + 7]
                        != b"\x00\x00" or question_end + 11 + int.from_bytes(data[question_end + 9:question_end + 11])
                        != len(data)):
                    return None
                edns = _EDNS_DO if data[question_end + 7] & 0x80 else _EDNS
                limit = min(max(int.from_bytes(data[question_end + 3:question_end + 5]), UDP_PLAIN_LIMIT),
                            self.max_udp_payload)
            else:
                return None
        except IndexError:
            return None
        if end - 12 > MAX_NAME:
            return None
        key = data[12:end].lower() + data[end:question_end] + _EDNS_MARK[edns]
        entry = self._cache.get(key)
        if entry is None:
            if self._forward_cache is None:
                return None
            return self._cached_forward(data, key + _FLAGS_MARK[(data[2] & 1) | (data[3] >> 3 & 2)], end, limit, tcp)
        # The ID's low byte picks one of the weighted orders: per query, and the same for the same message.
        variant = entry.fitted(data[1] & entry.mask, TCP_LIMIT if tcp else limit)
        if variant is None:
            return None
        self._queries[entry.stat] += 1
        self._metrics.cache_hits += 1
        reply = b"".join((data[:2], variant.flags[(data[2] & 1) | (data[3] >> 3 & 2)], variant.counts,
                          data[12:end], variant.tail))
        if variant is entry.truncated:
            # Not kept in the exact cache, whose hits would not count the truncation.
            self._metrics.truncated += 1
        elif not tcp:
            self._keep_exact(data, entry, reply)
        return reply

    def _keep_exact(self, data: bytes, entry: _Entry, reply: bytes) -> None:
        if self._exact_bytes + len(reply) > EXACT_BYTES:
            self._exact, self._exact_bytes = {}, 0
        exact = self._exact.get(data[2:])
        if exact is None:
            exact = self._exact[data[2:]] = _Exact(entry.mask + 1, self._metrics.slot(entry.stat))
        exact.replies[data[1] & exact.mask] = reply[2:]
        self._exact_bytes += len(reply)

    def _cached_forward(self, data: bytes, key: bytes, end: int, limit: int, tcp: bool) -> bytes | None:
        assert self._forward_cache is not None
        response = self._forward_cache.get(key)
        if response is None or (len(response) > limit and not tcp):
            return None
        self._queries[_stat(int.from_bytes(data[end:end + 2]), response[3] & 0x0F)] += 1
        self._metrics.forward_cache_hits += 1
        # The key holds the query's RD and CD, so the cached flags are already this query's.
        return b"".join((data[:2], response[2:12], data[12:end], response[end:]))

    # The slow path --------------------------------------------------------------------------------

    def answer(self, data: bytes, tcp: bool = False) -> bytes | Forward | None:
        """The reply to any message: bytes, a Forward for names outside the zone, or None (drop).

        The general path: callers try ``fast`` first.
        """
        data = bytes(data)
        try:
            record = DNSRecord.parse(data)
        except Exception:
            # dnslib raises more than DNSError on garbage; whatever it is, the message is malformed.
            return self._error_header(data, RCODE.FORMERR, "malformed")
        header = record.header
        if header.qr:
            self._metrics.dropped["response"] += 1
            return None
        if not all(_valid_name(q.qname.label) for q in record.questions):
            # dnslib reads names it cannot write back (labels over 63 bytes through pointers).
            record.questions = []
            return self._error(record, RCODE.FORMERR)
        if header.opcode != OPCODE.QUERY:
            return self._error(record, RCODE.NOTIMP)
        options = [rr for rr in record.ar if rr.rtype == _OPT]
        if len(record.questions) != 1 or len(options) > 1:
            return self._error(record, RCODE.FORMERR)
        edns, limit = _NO_EDNS, UDP_PLAIN_LIMIT
        if options:
            opt = options[0]
            if (opt.ttl >> 16) & 0xFF:
                return self._bad_version(record, opt)
            edns = _EDNS_DO if opt.ttl & 0x8000 else _EDNS
            limit = min(max(opt.rclass, UDP_PLAIN_LIMIT), self.max_udp_payload)
        q = record.questions[0]
        question = Question(
            id=data[:2], rd=header.rd, cd=header.cd, opcode=header.opcode, labels=tuple(q.qname.label),
            qtype=q.qtype, qclass=q.qclass, edns=edns, limit=TCP_LIMIT if tcp else limit,
        )
        key_labels = question.key_labels
        if not in_zone(self.zone, key_labels):
            if not self.forwarding:
                return self._reply_to(question, RCODE.REFUSED, "refused")
            if self._forward_cache is not None:
                cached = self._forward_cache.get(_forward_key(question))
                if cached is not None:
                    self._metrics.forward_cache_hits += 1
                    return self._relay(question, _restore_case(cached, question))
                self._metrics.forward_cache_misses += 1
            return Forward(data, question)
        if question.qclass not in _ZONE_CLASSES or question.qtype in _ZONE_TRANSFERS:
            return self._reply_to(question, RCODE.REFUSED, "refused")
        return self.reply(question)

    def reply(self, question: Question) -> bytes:
        """The in-zone reply to ``question``, from the cache when it has it (filling it otherwise)."""
        key_labels = question.key_labels
        key = _key(question)
        entry = self._cache.get(key)
        # The same choice of order as the fast path makes: the ID's low byte.
        index = question.id[1] & (VARIANTS - 1)
        answer = None
        if entry is None:
            answer = self._resolve(key_labels, question.qtype, index)
            entry = _Entry(VARIANTS if answer.shuffled else 1, _stat(question.qtype, answer.rcode), answer.rcode)
            if len(self._cache) >= self._cache_entries:
                self._cache = {}
            self._cache[key] = entry
        index &= entry.mask
        # The key is the wire name, then qtype, qclass and the EDNS mark (5 bytes).
        name_length = len(key) - 5
        variant = entry.variants[index]
        if variant is None:
            if answer is None:
                answer = self._resolve(key_labels, question.qtype, index)
            full = self._pack(key_labels, question, answer, with_additional=True)
            variant = entry.variants[index] = _Variant(full, name_length)
        self._queries[entry.stat] += 1
        self._metrics.cache_misses += 1
        if variant.size > question.limit:
            variant = self._fitted(entry, index, question, key_labels, answer, name_length)
        return _patch(variant, question)

    def _resolve(self, key_labels: tuple[bytes, ...], qtype: int, index: int) -> Answer:
        # Answers that are not shuffled do not use the rng, so any index gives them.
        seed = f"{index}:{b'.'.join(key_labels)!r}:{self._snapshot.revision}"
        answer = resolve(self._snapshot, self.zone, key_labels, qtype, random.Random(seed))
        assert answer is not None, "called for in-zone names only"
        return answer

    def _fitted(self, entry: _Entry, index: int, question: Question, key_labels: tuple[bytes, ...],
                answer: Answer | None, name_length: int) -> _Variant:
        """A reply too big for the client: without additional records, else truncated (TC) and empty.

        Both are kept in ``entry`` (see ``_Entry.fitted``), so the next client with the same or any
        other limit gets cached bytes.
        """
        bare = entry.bare[index]
        if bare is None:
            if answer is None:
                answer = self._resolve(key_labels, question.qtype, index)
            if answer.additional:
                bare = _Variant(self._pack(key_labels, question, answer, with_additional=False), name_length)
            else:  # the same bytes as the full reply
                bare = entry.variants[index]
                assert bare is not None
            entry.bare[index] = bare
        if bare.size <= question.limit:
            return bare
        self._metrics.truncated += 1
        if entry.truncated is None:
            empty = Answer(rcode=entry.rcode)
            entry.truncated = _Variant(self._pack(key_labels, question, empty, with_additional=False, tc=True),
                                       name_length)
        return entry.truncated

    def _pack(self, key_labels: Sequence[bytes], question: Question, answer: Answer, *, with_additional: bool,
              tc: bool = False) -> bytes:
        header = DNSHeader(id=0, qr=1, aa=1, tc=int(tc), rd=0, ra=int(self.forwarding), rcode=answer.rcode)
        record = DNSRecord(header, q=DNSQuestion(DNSLabel(tuple(key_labels)), question.qtype, question.qclass),
                           rr=list(answer.answer), auth=list(answer.authority),
                           ar=list(answer.additional) if with_additional else [])
        if question.edns:
            record.add_ar(self._opt(question.edns == _EDNS_DO))
        return bytes(record.pack())

    def _opt(self, do: bool, ext_rcode: int = 0) -> RR:
        return EDNS0(udp_len=self.max_udp_payload, ext_rcode=ext_rcode, flags="do" if do else "")

    # Replies that are not answers ----------------------------------------------------------------

    def forwarded(self, forward: Forward, response: bytes | None) -> bytes:
        """The client's reply to a forwarded question: the upstream's response, or SERVFAIL when there is none.

        A response bigger than the client can take over UDP becomes a TC reply. Responses that may be
        cached are kept for the next identical question.
        """
        question = forward.question
        if response is None:
            return self._reply_to(question, RCODE.SERVFAIL, "servfail")
        if self._forward_cache is not None:
            self._forward_cache.put(_forward_key(question), response)
        return self._relay(question, response)

    def _relay(self, question: Question, response: bytes) -> bytes:
        if len(response) <= question.limit:
            self._queries[_stat(question.qtype, response[3] & 0x0F)] += 1
            return question.id + response[2:]
        self._metrics.truncated += 1
        return self._reply_to(question, RCODE.NOERROR, None, tc=True, aa=False)

    def _reply_to(self, question: Question, rcode: int, reason: str | None, tc: bool = False,
                  aa: bool = False) -> bytes:
        header = DNSHeader(id=0, qr=1, aa=int(aa), tc=int(tc), rd=question.rd, cd=question.cd,
                           ra=int(self.forwarding), rcode=rcode)
        record = DNSRecord(header, q=DNSQuestion(DNSLabel(question.labels), question.qtype, question.qclass))
        if question.edns:
            record.add_ar(self._opt(question.edns == _EDNS_DO))
        self._queries[_stat(question.qtype, rcode)] += 1
        if reason is not None:
            self._metrics.errors[reason] += 1
        return question.id + record.pack()[2:]

    def _error(self, record: DNSRecord, rcode: int) -> bytes:
        """An error reply echoing what could be parsed of the query (its questions, its EDNS)."""
        header = record.header
        reply = DNSRecord(DNSHeader(id=header.id, qr=1, opcode=header.opcode, rd=header.rd, cd=header.cd,
                                    ra=int(self.forwarding), rcode=rcode), questions=list(record.questions))
        if any(rr.rtype == _OPT for rr in record.ar):
            reply.add_ar(self._opt(False))
        self._metrics.errors[RCODE.get(rcode, str(rcode)).lower()] += 1
        return bytes(reply.pack())

    def _bad_version(self, record: DNSRecord, opt: RR) -> bytes:
        """RFC 6891: an unknown EDNS version gets BADVERS (extended rcode 16) and our version, 0."""
        header = record.header
        reply = DNSRecord(DNSHeader(id=header.id, qr=1, rd=header.rd, cd=header.cd, ra=int(self.forwarding)),
                          questions=list(record.questions))
        reply.add_ar(self._opt(bool(opt.ttl & 0x8000), ext_rcode=RCODE_BADVERS >> 4))
        self._metrics.errors["badvers"] += 1
        return bytes(reply.pack())

    def _error_header(self, data: bytes, rcode: int, reason: str) -> bytes | None:
        """A bare header reply (no sections) when only the header can be read; None (drop) when not even that."""
        if len(data) < 12 or data[2] & 0x80:
            self._metrics.dropped[reason] += 1
            return None
        self._metrics.errors["formerr"] += 1
        # ID; QR=1 with the query's opcode and RD; RA; the rcode; no records.
        flags = 0x8000 | (data[2] & 0x79) << 8 | (0x80 if self.forwarding else 0) | rcode
        return data[:2] + struct.pack("!HHHHH", flags, 0, 0, 0, 0)


RCODE_BADVERS = 16


# The qtype label of sidecar_dns_queries_total: these types by name, every other one as "other",
# so the label stays bounded whatever types clients send (docs/metrics.md).
COUNTED_QTYPES = ("A", "AAAA", "SRV", "TXT", "PTR", "SOA", "NS", "CNAME", "MX", "NAPTR", "ANY", "HTTPS", "SVCB",
                  "CAA", "DS", "DNSKEY", "AXFR", "IXFR")
_QTYPE_LABELS = {int(getattr(QTYPE, name)): name for name in COUNTED_QTYPES}


def _stat(qtype: int, rcode: int) -> tuple[str, str]:
    return _QTYPE_LABELS.get(qtype, "other"), str(RCODE.get(rcode, rcode))


def _valid_name(labels: Sequence[bytes]) -> bool:
    return all(0 < len(part) <= 63 for part in labels) and sum(len(part) + 1 for part in labels) + 1 <= MAX_NAME


def _key(question: Question) -> bytes:
    """The cache key the fast path computes from the bytes: lower-cased name, qtype, qclass, EDNS mark."""
    return (_wire_name(question.key_labels) + struct.pack("!HH", question.qtype, question.qclass)
            + _EDNS_MARK[question.edns])


def _forward_key(question: Question) -> bytes:
    return _key(question) + _FLAGS_MARK[question.rd | question.cd << 1]


def _wire_name(labels: Sequence[bytes]) -> bytes:
    return b"".join(bytes((len(part),)) + part for part in labels) + b"\x00"


def _patch(variant: _Variant, question: Question) -> bytes:
    return b"".join((question.id, variant.flags[question.rd | question.cd << 1], variant.counts,
                     _wire_name(question.labels), variant.tail))


def _restore_case(reply: bytes, question: Question) -> bytes:
    """Set the reply's ID, RD and CD from the query and write the question in the query's case."""
    wire = _wire_name(question.labels)
    flags = bytes((reply[2] | question.rd, reply[3] | question.cd << 4))
    return question.id + flags + reply[4:12] + wire + reply[12 + len(wire):]
