"""DNS answer cost per query for a name with many agents behind it, in process (no sockets).

Usage: python bench/scale/bignames.py [--agents 100,1000,2000] [--queries 400]

For each size, a catalog of N agents behind one capability (``g0``), then A and
SRV queries over UDP without EDNS (512 bytes: truncated), UDP with EDNS 1232 and
TCP, as the listeners call the answers layer (``fast`` then ``answer``): the
first query after the snapshot (cold cache), then ``--queries`` more with
random IDs (so every weighted order is asked; per-query median and p99).
Run it with ``PYTHONPATH`` set to the tree to measure when the installed ``sidecar``
package is another checkout (the script's directory, not the repository root, is
first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import dns.message
from population import agent, machine, pct  # type: ignore[import-not-found]

from sidecar.catalog import Catalog, Reset
from sidecar.dns.answers import Answers
from sidecar.dns.resolver import Zone
from sidecar.metrics import Metrics

MODES = {"udp512": (None, False), "udp_edns1232": (1232, False), "tcp": (None, True)}


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def query(qtype: str, edns_size: int | None) -> bytes:
    if edns_size is None:
        return bytes(dns.message.make_query("g0.agents.local", qtype).to_wire())
    return bytes(dns.message.make_query("g0.agents.local", qtype, use_edns=0, payload=edns_size).to_wire())


def measure(size: int, queries: int, rng: random.Random) -> dict[str, dict[str, float]]:
    catalog = Catalog()
    catalog.apply([Reset(1, {agent(i * 10).key(""): agent(i * 10) for i in range(size)})])
    metrics = Metrics().dns
    answers = Answers(Zone(), catalog.snapshot, metrics)
    row = {}
    for qtype in ("A", "SRV"):
        for mode, (edns_size, tcp) in MODES.items():
            answers.update(catalog.snapshot)  # a cold cache, as after every change
            message = query(qtype, edns_size)
            times = []
            for n in range(queries + 1):
                data = rng.randbytes(2) + message[2:] if n else message
                started = time.perf_counter()
                reply = answers.fast(data, tcp) or answers.answer(data, tcp)
                times.append(time.perf_counter() - started)
                assert isinstance(reply, bytes) and reply[:2] == data[:2]
            rest = times[1:]
            row[f"{qtype} {mode}"] = {"first_ms": ms(times[0]), "p50_ms": ms(statistics.median(rest)),
                                      "p99_ms": ms(pct(rest, 0.99)), "mean_ms": ms(statistics.fmean(rest)),
                                      "reply_bytes": len(reply), "tc": bool(reply[2] & 0x02)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="100,1000,2000")
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    result: dict[str, object] = {"machine": machine()}
    for size in (int(v) for v in args.agents.split(",")):
        result[str(size)] = measure(size, args.queries, rng)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
