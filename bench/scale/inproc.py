"""Per-change costs at 100,000 agents, in process (no etcd, no sockets).

Usage: python bench/scale/inproc.py [--agents 100000] [--changes 50] [--profile]

Times, over the population of population.py: decoding every agent's JSON (what a
relist does), the catalog's Reset, one Upsert through ``Catalog.apply`` (the
snapshot rebuild per change), and the DNS answers layer after a change (the
cache drop, then the first answer for a name of 100 agents, of 10,000 agents
and of one id, which is what each name costs once after every change; then the
same query again, from the wire cache where the answer is cached).
``--profile`` prints the top of a cProfile of the Upserts.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import time

import dns.message
from population import agent, machine, rss_mb  # type: ignore[import-not-found]

from sidecar.catalog import Catalog, Reset, Upsert
from sidecar.dns.answers import Answers
from sidecar.dns.resolver import Zone
from sidecar.metrics import Metrics
from sidecar.model import decode_agent


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def big_names(sizes: str) -> dict[str, dict[str, float]]:
    """One A and one SRV answer (UDP, 512 bytes, then again) for a name with N agents behind it."""
    result = {}
    for size in (int(v) for v in sizes.split(",")):
        catalog = Catalog()
        catalog.apply([Reset(1, {agent(i * 10).key(""): agent(i * 10) for i in range(size)})])
        answers = Answers(Zone(), catalog.snapshot, Metrics().dns)
        row = {}
        for qtype in ("A", "SRV"):
            query = dns.message.make_query("g0.agents.local", qtype).to_wire()
            for attempt in ("first", "again"):
                started = time.perf_counter()
                answers.fast(query) or answers.answer(query)
                row[f"{qtype}_{attempt}"] = ms(time.perf_counter() - started)
        result[str(size)] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--big", default="100,500,1000,2000", help="agents behind one name, for big_names()")
    args = parser.parse_args()
    raw = {agent(i).key(""): agent(i).to_bytes() for i in range(args.agents)}
    base_mb = rss_mb(os.getpid())
    started = time.perf_counter()
    agents = {key: decode_agent(value) for key, value in raw.items()}
    decode_s = time.perf_counter() - started
    decoded_mb = rss_mb(os.getpid()) - base_mb
    catalog = Catalog()
    started = time.perf_counter()
    catalog.apply([Reset(1, agents)])
    reset_s = time.perf_counter() - started
    indexed_mb = rss_mb(os.getpid()) - base_mb - decoded_mb
    answers = Answers(Zone(), catalog.snapshot, Metrics().dns)
    catalog.subscribe(lambda snapshot, events: answers.update(snapshot))
    # The g<k> names (10,000 agents each at 100,000) are measured apart, by big_names(): one answer there
    # costs seconds (every query packs every record, then truncates).
    queries = {"c7 A (100 agents)": dns.message.make_query("c7.agents.local", "A").to_wire(),
               "c7 SRV (100 agents)": dns.message.make_query("c7.agents.local", "SRV").to_wire(),
               "a42.id A (1 agent)": dns.message.make_query("a42.id.agents.local", "A").to_wire()}
    applies: list[float] = []
    first: dict[str, list[float]] = {name: [] for name in queries}
    cached: dict[str, list[float]] = {name: [] for name in queries}
    profiler = cProfile.Profile() if args.profile else None
    for n in range(args.changes):
        i = (n * 7919) % args.agents
        changed = agent(i, n + 1)
        event = Upsert(changed.key(""), changed, 2 + n)
        if profiler:
            profiler.enable()
        started = time.perf_counter()
        catalog.apply([event])
        applies.append(time.perf_counter() - started)
        if profiler:
            profiler.disable()
        for name, query in queries.items():
            started = time.perf_counter()
            reply = answers.answer(query)
            first[name].append(time.perf_counter() - started)
            assert isinstance(reply, bytes)
            started = time.perf_counter()
            answers.fast(query) or answers.answer(query)
            cached[name].append(time.perf_counter() - started)
    result = {
        "machine": machine(), "agents": args.agents,
        "decode_all_s": round(decode_s, 3), "decode_us_per_agent": round(decode_s / args.agents * 1e6, 2),
        "decoded_agents_rss_mb": round(decoded_mb, 1),
        "catalog_reset_s": round(reset_s, 3), "catalog_indexes_rss_mb": round(indexed_mb, 1),
        "upsert_apply_ms": {"p50": ms(statistics.median(applies)), "max": ms(max(applies))},
        "dns_first_answer_after_change_ms": {name: ms(statistics.median(v)) for name, v in first.items()},
        "dns_second_answer_us": {name: round(statistics.median(v) * 1e6, 1) for name, v in cached.items()},
    }
    result["dns_answer_ms_by_agents_behind_one_name"] = big_names(args.big)
    print(json.dumps(result, indent=2))
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(12)


if __name__ == "__main__":
    main()
