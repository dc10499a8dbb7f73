"""Coverage-guided fuzzing of the DNS message path with atheris (libFuzzer).

    python tests/fuzz/fuzz_dns.py -runs=1000000 -max_len=512 CORPUS_DIR
    python tests/fuzz/fuzz_dns.py --seed CORPUS_DIR     # writes valid queries to start from

Feeds bytes mutated from valid queries to Answers.fast and Answers.answer (UDP
and TCP limits, the exact-message cache included) over a snapshot with
shuffled, truncating and negative answers. A crash is an uncaught exception,
a reply that is not a parseable response to the query, or a fast-path reply
that differs from the general path. tests/fuzz/test_fuzz.py runs a short
smoke of it in the suite; the long runs are recorded in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import sys

import atheris

# FUZZ_SMOKE=1 (the suite's smoke run) skips the instrumentation, which costs more than the run itself.
with contextlib.nullcontext() if os.environ.get("FUZZ_SMOKE") else atheris.instrument_imports():
    import dnslib

    from sidecar.catalog import Catalog, Reset
    from sidecar.dns.answers import Answers, Forward
    from sidecar.dns.resolver import Zone
    from sidecar.metrics import Metrics
    from sidecar.model import parse_agent


def build() -> Answers:
    agents = {}
    for i in range(60):
        agent = parse_agent({"id": f"a{i}", "name": f"svc{i % 3}", "address": f"10.0.{i // 250}.{i % 250}",
                             "port": 8000 + i, "capabilities": ["chat", f"cap{i % 5}"],
                             "tags": ["gpu"] if i % 2 else [], "zone": "z1" if i % 4 else "z2", "weight": i * 7,
                             "metadata": {"k": "v" * i}})
        agents[agent.key("")] = agent
    catalog = Catalog()
    catalog.apply([Reset(7, agents)])
    return Answers(Zone(local_zone="z1"), catalog.snapshot, Metrics().dns)


ANSWERS = build()


def check(data: bytes, reply: bytes | Forward | None) -> None:
    if reply is None or isinstance(reply, Forward):
        return
    if reply[:2] != data[:2] or not reply[2] & 0x80:
        raise AssertionError("reply is not a response to the query")
    dnslib.DNSRecord.parse(reply)


def one(data: bytes) -> None:
    check(data, ANSWERS.fast(data))
    check(data, ANSWERS.answer(data))
    check(data, ANSWERS.answer(data, tcp=True))
    fast = ANSWERS.fast(data)
    if fast is not None and fast != ANSWERS.answer(data):
        raise AssertionError("fast path differs from the general path")


def seed(directory: str) -> None:
    """Valid queries for every kind of name and type the zone answers, as a starting corpus."""
    import os

    os.makedirs(directory, exist_ok=True)
    names = ["chat.agents.local", "gpu.chat.agents.local", "_chat._tcp.agents.local", "svc1.service.agents.local",
             "a7.id.agents.local", "_services._dns-sd._udp.agents.local", "nope.agents.local", "agents.local",
             "CHAT.Agents.LOCAL", "example.org"]
    count = 0
    for name in names:
        for qtype in ("A", "AAAA", "SRV", "TXT", "PTR", "SOA", "ANY"):
            for edns in (False, True):
                query = dnslib.DNSRecord.question(name, qtype)
                if edns:
                    query.add_ar(dnslib.EDNS0(udp_len=1232))
                with open(os.path.join(directory, f"q{count}"), "wb") as handle:
                    handle.write(query.pack())
                count += 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--seed":
        seed(sys.argv[2])
    else:
        atheris.Setup(sys.argv, one)
        atheris.Fuzz()
