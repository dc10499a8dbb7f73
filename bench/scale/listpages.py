"""The initial list at 100,000 agents: one Range (get_prefix) against the paged list (list_pages).

Usage: python bench/scale/listpages.py [--agents 100000] [--pages 1000,5000] [--rounds 3]

A private etcd on tmpfs, bulk-loaded with the population of population.py; then,
in turn, each way of listing ``/services/`` is timed (wall, in process, decoding of
the agents not included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

from population import etcd_client, grant_leases, load, machine, phase, rss_mb  # type: ignore[import-not-found]

from sidecar.dev import EmbeddedEtcd
from sidecar.registry.etcd import EtcdClient


async def timed(label: str, listing: object) -> tuple[float, int]:
    started = time.perf_counter()
    count = 0
    if label == "one range":
        _, kvs = await listing  # type: ignore[misc]
        count = len(kvs)
    else:
        async for _, kvs in listing:  # type: ignore[attr-defined]
            count += len(kvs)
    return time.perf_counter() - started, count


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--pages", default="1000,5000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    etcd = EmbeddedEtcd("listpages")
    etcd.start()
    result: dict[str, object] = {"machine": machine(), "agents": args.agents}
    try:
        async with etcd_client(etcd.endpoint) as raw:
            leases = await grant_leases(raw)
            phase(f"loading {args.agents} agents")
            await load(raw, 0, args.agents, leases)
        client = EtcdClient([etcd.endpoint], timeout=60)
        ways: dict[str, list[float]] = {"one range": []}
        for size in (int(v) for v in args.pages.split(",")):
            ways[f"pages of {size}"] = []
        for round_ in range(args.rounds):
            for label in ways:
                prefix = "/services/"
                if label == "one range":
                    listing: object = client.get_prefix(prefix)
                else:
                    listing = client.list_pages(prefix, int(label.rsplit(" ", 1)[1]))
                seconds, count = await timed(label, listing)
                assert count == args.agents, (label, count)
                ways[label].append(seconds)
                phase(f"round {round_}: {label}: {seconds:.3f} s, rss {rss_mb(os.getpid()):.0f} MB")
        await client.close()
        result["list_s"] = {label: {"median": round(statistics.median(v), 3), "all": [round(x, 3) for x in v]}
                            for label, v in ways.items()}
    finally:
        etcd.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
