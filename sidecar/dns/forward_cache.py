"""Upstream responses to forwarded questions, kept for their TTL (as CoreDNS's cache plugin and dnsmasq do).

Pure: wire bytes in, wire bytes out, time from an injected clock. The caller
keys entries by (lower-cased qname, qtype, qclass, EDNS: none / on / on with
DO, RD and CD) and patches the ID and the question's case per query.

- Positive answers (NOERROR with records) live for the smallest TTL of their
  records, capped at ``max_ttl``.
- Negative answers (NXDOMAIN, or NOERROR without answer records) live for
  min(SOA TTL, SOA minimum) of the SOA in the authority section (RFC 2308),
  capped at ``NEGATIVE_MAX_TTL`` and ``max_ttl``; without a SOA they are not kept.
- Not kept: any other rcode (SERVFAIL, REFUSED...), TC responses, responses
  whose OPT carries options (a cookie or NSID belongs to one client's query),
  TTL 0, and anything that cannot be walked record by record.
- Served answers carry every TTL as the entry's lifetime minus the whole
  seconds it has spent here, so no client keeps a record longer than the
  upstream allowed.
- At most ``size`` entries, least recently used dropped first.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable

NEGATIVE_MAX_TTL = 30

_NOERROR, _NXDOMAIN = 0, 3
_SOA, _OPT = 6, 41
_RR_FIXED = struct.Struct("!HHIH")  # type, class, TTL, rdlength


class _Cached:
    __slots__ = ("age", "lifetime", "offsets", "response", "served", "stored")

    def __init__(self, response: bytes, offsets: tuple[int, ...], lifetime: int, stored: float) -> None:
        self.response = response
        self.offsets = offsets
        self.lifetime = lifetime
        self.stored = stored
        self.age = 0
        self.served = _with_ttl(response, offsets, lifetime)


class ForwardCache:
    """Upstream responses by question key, each until its TTL runs out; least recently used dropped when full."""

    def __init__(self, size: int, max_ttl: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.max_ttl = max_ttl
        self._clock = clock
        self._entries: OrderedDict[bytes, _Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> bytes | None:
        """The response kept under ``key`` with its TTLs counted down, or None (absent or expired)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        age = int(self._clock() - entry.stored)
        if age >= entry.lifetime:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        if age != entry.age:
            entry.age = age
            entry.served = _with_ttl(entry.response, entry.offsets, entry.lifetime - age)
        return entry.served

    def put(self, key: bytes, response: bytes) -> bool:
        """Keep ``response`` under ``key`` if it may be cached (see the module docstring); whether it was kept."""
        layout = cacheable(response, self.max_ttl)
        if layout is None:
            return False
        lifetime, offsets = layout
        entries = self._entries
        entries.pop(key, None)
        while len(entries) >= self.size:
            entries.popitem(last=False)
        entries[key] = _Cached(response, offsets, lifetime, self._clock())
        return True


def cacheable(response: bytes, max_ttl: int) -> tuple[int, tuple[int, ...]] | None:
    """How long ``response`` may be kept and where its TTL fields are, or None when it must not be kept."""
    if len(response) < 12 or response[2] & 0x02:
        return None
    rcode = response[3] & 0x0F
    if rcode not in (_NOERROR, _NXDOMAIN):
        return None
    qdcount, ancount, nscount, arcount = struct.unpack_from("!HHHH", response, 4)
    offsets: list[int] = []
    lifetime = max_ttl
    soa: int | None = None
    try:
        position = 12
        for _ in range(qdcount):
            position = _skip_name(response, position) + 4
        for index in range(ancount + nscount + arcount):
            position = _skip_name(response, position)
            rtype, _, ttl, rdlength = _RR_FIXED.unpack_from(response, position)
            rdata = position + _RR_FIXED.size
            position = rdata + rdlength
            if position > len(response):
                return None
            if rtype == _OPT:
                if rdlength:
                    return None
                continue
            ttl = ttl if ttl < 1 << 31 else 0  # RFC 2181: a TTL with the top bit set means 0
            offsets.append(rdata - 6)
            lifetime = min(lifetime, ttl)
            if rtype == _SOA and ancount <= index < ancount + nscount and rdlength >= 22:
                minimum = int.from_bytes(response[position - 4:position], "big")
                soa = min(ttl, minimum) if soa is None else min(soa, ttl, minimum)
    except (IndexError, ValueError, struct.error):
        return None
    if position != len(response):
        return None
    if rcode == _NXDOMAIN or not ancount:
        if soa is None:
            return None
        lifetime = min(lifetime, soa, NEGATIVE_MAX_TTL)
    if lifetime <= 0:
        return None
    return lifetime, tuple(offsets)


def _skip_name(data: bytes, position: int) -> int:
    """Where the name starting at ``position`` ends (a compression pointer ends it)."""
    while True:
        length = data[position]
        if length == 0:
            return position + 1
        if length >= 0xC0:
            return position + 2  # a short message fails the caller's length checks
        if length > 63:
            raise ValueError("bad label length")
        position += length + 1


def _with_ttl(response: bytes, offsets: tuple[int, ...], ttl: int) -> bytes:
    served = bytearray(response)
    packed = ttl.to_bytes(4, "big")
    for offset in offsets:
        served[offset:offset + 4] = packed
    return bytes(served)
