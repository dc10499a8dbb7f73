"""The chaos scenarios in long mode: the issue's loads and durations, figures printed and saved as JSON.

Usage: python bench/chaos/run.py [--only leader_kill,quorum_loss,...] [--out results.json]

The same scenarios as tests/chaos (tests/chaos/scenarios.py, tests/chaos/partition.py)
at the LONG scale: 6,000 DNS qps over two sidecars (5,000 on the resource-limited
one), 200-500 proxy requests a second, 10 registrations a second, a 60 s quorum
loss and a 60 s partition, 60 s at 128 MiB / one CPU. Each scenario gets a fresh
3-member etcd cluster on loopback. Run it from the repository root as root
(network namespaces, cgroups); a scenario that cannot run here says why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.chaos import scenarios
from tests.chaos.isolation import MemoryCgroup, NetnsPair
from tests.chaos.partition import partition
from tests.chaos.rig import LONG, Outcome, Scale
from tests.etcd_cluster import EtcdCluster

ClusterScenario = Callable[[EtcdCluster, str, Scale], Awaitable[Outcome]]
CLUSTER_SCENARIOS: dict[str, ClusterScenario] = {
    "leader_kill": scenarios.leader_kill,
    "quorum_loss": scenarios.quorum_loss,
    "compaction": scenarios.compaction,
    "bad_agents": scenarios.bad_agents,
    "membership": scenarios.membership,
    "frozen_member": scenarios.frozen_member,
    "resource_limits": scenarios.resource_limits,
}
ORDER = [*CLUSTER_SCENARIOS, "partition"]


async def run_one(name: str, scale: Scale) -> Outcome:
    prefix = f"/chaos-{uuid.uuid4().hex[:8]}"
    if name == "partition":
        reason = NetnsPair.unavailable()
        if reason:
            return Outcome(name, figures={"skipped": reason})
        return await partition(prefix, scale)
    if name == "resource_limits" and MemoryCgroup.unavailable():
        return Outcome(name, figures={"skipped": MemoryCgroup.unavailable()})
    cluster = EtcdCluster(3)
    cluster.start()
    try:
        return await CLUSTER_SCENARIOS[name](cluster, prefix, scale)
    finally:
        cluster.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ORDER), help="comma-separated scenarios")
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    args = parser.parse_args()
    results = []
    total_ok = total = 0
    for name in args.only.split(","):
        started = time.monotonic()
        try:
            outcome = asyncio.run(run_one(name, LONG))
            error = ""
        except AssertionError as exc:
            outcome, error = Outcome(name), f"check failed: {exc}"
        except Exception:
            outcome, error = Outcome(name), traceback.format_exc(limit=3)
        took = time.monotonic() - started
        print(outcome.summary(), flush=True)
        if error:
            print(f"  ERROR: {error}", flush=True)
        print(f"  took {took:.0f}s", flush=True)
        total_ok += outcome.served.ok
        total += outcome.served.total
        results.append({"scenario": name, "error": error, "seconds": round(took),
                        "dns": [outcome.dns.ok, outcome.dns.total, dict(outcome.dns.reasons)],
                        "proxy": [outcome.proxy.ok, outcome.proxy.total, dict(outcome.proxy.reasons)],
                        "registry": [outcome.registry.ok, outcome.registry.total, dict(outcome.registry.reasons)],
                        "figures": {k: v if isinstance(v, (int, float, str, bool, list)) else str(v)
                                    for k, v in outcome.figures.items()}})
    share = 100.0 * total_ok / total if total else 100.0
    print(f"availability over every scenario: {total_ok}/{total} ({share:.4f}%)")
    if args.out:
        Path(args.out).write_text(json.dumps({"availability": [total_ok, total], "scenarios": results}, indent=1))


if __name__ == "__main__":
    main()
