"""A long coverage-guided fuzz run of the DNS message path with atheris.

    python bench/dns/fuzz.py -runs=300000 [corpus_dir]

Feeds arbitrary bytes to Answers.fast and Answers.answer (UDP and TCP limits)
over a snapshot with shuffled, truncating and negative answers. A crash is an
uncaught exception or a reply that is not a parseable response to the query.
Results are recorded in docs/dns.md (Fuzzing).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
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


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
