"""The zone's answers: (snapshot, question) -> Answer. Pure: no sockets, clock or loop.

Names are handled as tuples of lower-cased wire labels (bytes), the zone's
apex included; the caller lower-cases the question and restores its case on
the wire (0x20). Randomness (RFC 2782 weighted order) comes from the ``rng``
argument, so the same seed gives the same answer.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dnslib import AAAA, NS, PTR, QTYPE, RCODE, RR, SOA, SRV, TXT, A, DNSLabel

from ..catalog import Snapshot
from ..model import Agent
from ..serving import servable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Other-zone agents come after same-zone ones (SRV priority, and the order of A answers).
PRIORITY_LOCAL = 0
PRIORITY_REMOTE = 10
TXT_STRING_MAX = 255
# Keeps an agent's TXT answer well inside one 1232-byte EDNS datagram.
TXT_TOTAL_MAX = 1000
NS_LABELS = (b"ns", b"dns")
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 86400

_A, _AAAA, _SRV, _TXT, _PTR, _NS, _SOA, _ANY = (
    QTYPE.A, QTYPE.AAAA, QTYPE.SRV, QTYPE.TXT, QTYPE.PTR, QTYPE.NS, QTYPE.SOA, QTYPE.ANY)
_ADDRESS_TYPES = (_A, _AAAA)
_DNS_SD = (b"_services", b"_dns-sd", b"_udp")
# Empty non-terminals: names that exist only because names below them do (RFC 8020).
_EMPTY_NON_TERMINALS = ((b"service",), (b"id",), (b"_tcp",), (b"_udp",), (b"_dns-sd", b"_udp"), (b"dns",))


@dataclass(frozen=True, slots=True)
class Zone:
    """What the resolver needs to know besides the snapshot."""

    domain: str = "agents.local"
    ttl: int = 5
    negative_ttl: int = 5
    # This sidecar's zone: agents in it get SRV priority 0, the others 10.
    local_zone: str = ""
    # a_mode=proxy: A/AAAA answers give this address instead of the agents'.
    proxy_address: IPAddress | None = None
    # Glue for the NS host ns.dns.<zone> (the DNS listener, when it is a specific address).
    ns_address: IPAddress | None = None
    # health_check.panic: when no agent of a name is healthy, answer with all of them.
    panic: bool = False
    labels: tuple[bytes, ...] = field(init=False)

    def __post_init__(self) -> None:
        domain = self.domain.strip(".").lower()
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "labels", tuple(domain.encode("ascii").split(b".")) if domain else ())

    def relative(self, name: Sequence[bytes]) -> tuple[bytes, ...] | None:
        """The labels of ``name`` below the apex, or None when ``name`` is outside the zone."""
        depth = len(self.labels)
        if len(name) < depth or tuple(name[len(name) - depth:]) != self.labels:
            return None
        return tuple(name[: len(name) - depth])

    def name(self, *relative: bytes) -> DNSLabel:
        return DNSLabel((*relative, *self.labels))


@dataclass(slots=True)
class Answer:
    """An in-zone answer: rcode and the three record sections (no OPT)."""

    rcode: int = RCODE.NOERROR
    answer: list[RR] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)
    additional: list[RR] = field(default_factory=list)
    # True when the order of records came from the rng (so other seeds give other orders).
    shuffled: bool = False


def in_zone(zone: Zone, name: Sequence[bytes]) -> bool:
    """Whether ``name`` (lower-cased labels) is the apex or below it; such names are never forwarded."""
    return zone.relative(name) is not None


def resolve(snapshot: Snapshot, zone: Zone, name: Sequence[bytes], qtype: int, rng: random.Random) -> Answer | None:
    """The answer for (name, qtype) in the zone, or None when ``name`` is outside it (to be forwarded)."""
    rel = zone.relative(name)
    if rel is None:
        return None
    owner = DNSLabel(tuple(name))
    answer = Answer()
    if not rel:
        _apex(snapshot, zone, qtype, answer)
    elif rel == _DNS_SD:
        caps = sorted(c for c, agents in snapshot.by_capability.items() if servable(agents, zone.panic))
        if qtype in (_PTR, _ANY):
            answer.answer = [RR(owner, _PTR, ttl=zone.ttl, rdata=PTR(zone.name(b"_" + c.encode(), b"_tcp")))
                             for c in caps]
    elif rel == NS_LABELS:
        if zone.ns_address is not None and qtype in (_A, _AAAA, _ANY):
            answer.answer = _addresses(owner, zone, [zone.ns_address], qtype)
    else:
        found = _agents_at(snapshot, rel)
        if found is None:
            if rel not in _EMPTY_NON_TERMINALS:
                answer.rcode = RCODE.NXDOMAIN
        else:
            agents, kinds = found
            _records(zone, owner, list(servable(agents, zone.panic)), kinds, qtype, rng, answer)
    if not answer.answer:
        answer.additional = []
        answer.authority = [_soa(snapshot, zone, zone.negative_ttl)]
    return answer


def _apex(snapshot: Snapshot, zone: Zone, qtype: int, answer: Answer) -> None:
    apex = zone.name()
    if qtype in (_SOA, _ANY):
        answer.answer = [_soa(snapshot, zone, zone.ttl)]
    elif qtype == _NS:
        answer.answer = [RR(apex, _NS, ttl=zone.ttl, rdata=NS(zone.name(*NS_LABELS)))]
        if zone.ns_address is not None:
            answer.additional = _addresses(zone.name(*NS_LABELS), zone, [zone.ns_address], _ANY)


def _soa(snapshot: Snapshot, zone: Zone, ttl: int) -> RR:
    times = (snapshot.revision & 0xFFFFFFFF, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, zone.negative_ttl)
    return RR(zone.name(), _SOA, ttl=ttl, rdata=SOA(zone.name(*NS_LABELS), zone.name(b"hostmaster"), times))


# Which record types a name carries (besides the NODATA it gives for the others).
_ADDRESS_SRV = frozenset((_A, _AAAA, _SRV))
_ADDRESS_TXT = frozenset((_A, _AAAA, _TXT))
_SRV_ONLY = frozenset((_SRV,))


def _agents_at(snapshot: Snapshot, rel: tuple[bytes, ...]) -> tuple[tuple[Agent, ...], frozenset[int]] | None:
    """The agents a name stands for (healthy or not) and its record types; None for an unknown name."""
    try:
        text = tuple(part.decode("ascii") for part in rel)
    except UnicodeDecodeError:
        return None
    if len(text) == 1:
        agents = snapshot.by_capability.get(text[0])
        return (agents, _ADDRESS_SRV) if agents else None
    if len(text) == 2:
        first, second = text
        if second == "service":
            agents = snapshot.by_name.get(first)
            return (agents, _ADDRESS_SRV) if agents else None
        if second == "id":
            agents = snapshot.by_id.get(first)
            return (agents, _ADDRESS_TXT) if agents else None
        if second == "_tcp" and first.startswith("_"):
            agents = snapshot.by_capability.get(first[1:])
            return (agents, _SRV_ONLY) if agents else None
        tagged = tuple(a for a in snapshot.by_capability.get(second, ()) if first in a.tag_labels)
        return (tagged, _ADDRESS_SRV) if tagged else None
    return None


def _records(zone: Zone, owner: DNSLabel, agents: list[Agent], kinds: frozenset[int], qtype: int,
             rng: random.Random, answer: Answer) -> None:
    if qtype == _ANY:
        # RFC 8482: one RRset is enough; the first type this name has records of.
        for kind in (_A, _AAAA, _SRV, _TXT):
            if kind in kinds:
                _records(zone, owner, agents, kinds, kind, rng, answer)
                if answer.answer:
                    return
        return
    if qtype not in kinds or not agents:
        return
    if qtype == _TXT:
        answer.answer = [RR(owner, _TXT, ttl=zone.ttl, rdata=TXT(_txt_strings(agents[0])))]
        return
    ordered, answer.shuffled = _weighted_order(zone, agents, rng)
    if qtype == _SRV:
        answer.answer = [
            RR(owner, _SRV, ttl=zone.ttl, rdata=SRV(_priority(zone, a), a.weight, a.port, _target(zone, a)))
            for a in ordered
        ]
        glue = [a for a in ordered if a.ip is not None]
        answer.additional = [rr for a in glue for rr in _addresses(_target(zone, a), zone, [a.ip], _ANY)]
        return
    if zone.proxy_address is not None:
        answer.shuffled = False
        answer.answer = _addresses(owner, zone, [zone.proxy_address], qtype)
    else:
        answer.answer = _addresses(owner, zone, [a.ip for a in ordered if a.ip is not None], qtype)


def _addresses(owner: DNSLabel, zone: Zone, ips: Iterable[IPAddress | None], qtype: int) -> list[RR]:
    """A and/or AAAA records of ``owner`` for the addresses that match ``qtype`` (ANY: both)."""
    out = []
    for ip in ips:
        if isinstance(ip, ipaddress.IPv4Address) and qtype in (_A, _ANY):
            out.append(RR(owner, _A, ttl=zone.ttl, rdata=A(str(ip))))
        elif isinstance(ip, ipaddress.IPv6Address) and qtype in (_AAAA, _ANY):
            out.append(RR(owner, _AAAA, ttl=zone.ttl, rdata=AAAA(str(ip))))
    return out


def _priority(zone: Zone, agent: Agent) -> int:
    return PRIORITY_LOCAL if agent.zone == zone.local_zone else PRIORITY_REMOTE


def _target(zone: Zone, agent: Agent) -> DNSLabel:
    # An agent registered with a host name is reached at that name; the others at <id>.id.<zone>.
    if agent.ip is None:
        return DNSLabel(agent.address)
    return zone.name(agent.id_label.encode("ascii"), b"id")


def _weighted_order(zone: Zone, agents: list[Agent], rng: random.Random) -> tuple[list[Agent], bool]:
    """RFC 2782 order: by priority, then a weighted random draw within each priority."""
    groups: dict[int, list[Agent]] = {}
    for agent in agents:
        groups.setdefault(_priority(zone, agent), []).append(agent)
    ordered: list[Agent] = []
    shuffled = False
    for priority in sorted(groups):
        group = groups[priority]
        if len(group) > 1:
            shuffled = True
            ordered.extend(weighted_shuffle(group, rng))
        else:
            ordered.extend(group)
    return ordered, shuffled


def weighted_shuffle(agents: Sequence[Agent], rng: random.Random) -> list[Agent]:
    """RFC 2782 selection repeated until empty: weight-0 agents first in the list, rarely picked first."""
    remaining = sorted(agents, key=lambda a: a.weight != 0)
    out = []
    while remaining:
        total = sum(a.weight for a in remaining)
        pick = rng.randint(0, total)
        running = 0
        for index, agent in enumerate(remaining):
            running += agent.weight
            if running >= pick:
                out.append(remaining.pop(index))
                break
    return out


def _txt_strings(agent: Agent) -> list[bytes]:
    """``key=value`` strings, each cut to 255 bytes; metadata that would make the TXT too big is left out."""
    fixed = [
        ("name", agent.name), ("version", agent.version), ("protocol", agent.protocol),
        ("capabilities", ",".join(agent.capabilities)), ("tags", ",".join(agent.tags)),
    ]
    out = [_txt_string(k, v) for k, v in fixed]
    size = sum(len(s) + 1 for s in out)
    for key in sorted(agent.metadata):
        item = _txt_string(key, agent.metadata[key])
        if size + len(item) + 1 > TXT_TOTAL_MAX:
            continue
        out.append(item)
        size += len(item) + 1
    return out


def _txt_string(key: str, value: str) -> bytes:
    raw = f"{key}={value}".encode()
    if len(raw) <= TXT_STRING_MAX:
        return raw
    return raw[:TXT_STRING_MAX].decode("utf-8", "ignore").encode()
