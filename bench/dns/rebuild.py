"""Answer rebuild cost after a snapshot change, with 10,000 agents (in process, no sockets).

    python bench/dns/rebuild.py [--caps 1000] [--per-cap 10] [--repeat 3]

A snapshot change drops the wire cache (O(1)); answers are rebuilt on demand
by the general dnslib path. This measures: the catalog apply + cache drop, the
time to build every answer of the zone again (A and SRV of every capability,
A of every id: one query each, the first variant), and what that is per answer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import dns.message
from serve import bench_agents  # type: ignore[import-not-found]

from sidecar.catalog import Catalog, Reset, Upsert
from sidecar.dns.answers import Answers
from sidecar.dns.resolver import Zone
from sidecar.metrics import Metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--caps", type=int, default=1000)
    parser.add_argument("--per-cap", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    agents = bench_agents(args.caps, args.per_cap)
    catalog = Catalog()
    catalog.apply([Reset(1, agents)])
    answers = Answers(Zone(), catalog.snapshot, Metrics().dns)
    catalog.subscribe(lambda snapshot, events: answers.update(snapshot))
    names = [(f"cap{c}.agents.local", t) for c in range(args.caps) for t in ("A", "SRV")]
    names += [(f"{a.id}.id.agents.local", "A") for a in agents.values()]
    messages = [dns.message.make_query(n, t).to_wire() for n, t in names]
    for m in messages:  # bytes of the cached answers, for checking the rebuild below
        answers.answer(m)
    applies, rebuilds = [], []
    changed = next(iter(agents.values()))
    for round_ in range(args.repeat):
        started = time.perf_counter()
        catalog.apply([Upsert(changed.key(""), changed.with_status("healthy"), 2 + round_)])
        applied = time.perf_counter()
        hits = sum(answers.fast(m) is not None for m in messages)
        assert hits == 0, "the cache survived a snapshot change"
        rebuild_started = time.perf_counter()
        for m in messages:
            answers.answer(m)
        rebuilds.append(time.perf_counter() - rebuild_started)
        applies.append(applied - started)
    print(f"agents={len(agents)} capabilities={args.caps} answers={len(messages)} repeat={args.repeat}")
    print(f"catalog apply + cache drop: median {statistics.median(applies) * 1000:.2f} ms")
    rebuild = statistics.median(rebuilds)
    print(f"rebuild of every answer: median {rebuild * 1000:.0f} ms "
          f"({rebuild / len(messages) * 1e6:.1f} us per answer)")


if __name__ == "__main__":
    main()
