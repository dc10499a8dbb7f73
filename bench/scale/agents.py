"""100,000 agents in etcd and real `sidecar run` daemons holding them.

Usage: python bench/scale/agents.py [--levels 0,10000,50000,100000] [--changes 30] [--rate 50 --seconds 20]

A private etcd on tmpfs; agents are bulk-loaded (population.py). At each level
a fresh `sidecar run` is started: time to ready (spawn -> /readyz 200, Python
start included) and RSS 3 s after ready. At the largest level the last daemon
is kept and measured: propagation of one changed agent (etcd put acknowledged
-> the new address in the daemon's DNS answer for `a<i>.id.agents.local`, and
-> in its `GET /v1/agents?capability=c<k>`, polled every ~1 ms), then the
daemon's and etcd's CPU while ``--rate`` changes per second flow for
``--seconds``. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import random
import socket
import time
import urllib.request

import dns.message
import dns.rdatatype
from population import Sidecar, agent, cpu_seconds, etcd_client, grant_leases, load, machine, pct, phase, rss_mb  # type: ignore[import-not-found]

from sidecar.dev import EmbeddedEtcd


def dns_sees(port: int, query: bytes, address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        sock.sendto(query, ("127.0.0.1", port))
        reply = dns.message.from_wire(sock.recv(65535))
    return any(rr.address == address for rrset in reply.answer for rr in rrset if rrset.rdtype == dns.rdatatype.A)


def admin_sees(port: int, capability: str, agent_id: str, address: str) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/agents?capability={capability}", timeout=5) as reply:
        document = json.loads(reply.read())
    return any(a["id"] == agent_id and a["address"] == address for a in document["agents"])


async def propagation(client, sidecar: Sidecar, count: int, total: int, via: str, generation: int) -> list[float]:
    loop = asyncio.get_running_loop()
    delays = []
    leases = await grant_leases(client)
    for n in range(count):
        i = random.randrange(total)
        changed = agent(i, generation + n)
        if via == "dns":
            query = dns.message.make_query(f"{changed.id}.id.agents.local", "A").to_wire()
            check = functools.partial(dns_sees, sidecar.dns, query, changed.address)
        else:
            check = functools.partial(admin_sees, sidecar.admin, changed.capabilities[0], changed.id, changed.address)
        await client.put(changed.key("").encode(), changed.to_bytes(), lease=leases[0])
        acknowledged = time.perf_counter()
        # Polling is the measurement here: the daemon is another process, asked as a client would.
        while not await loop.run_in_executor(None, check):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        delays.append(time.perf_counter() - acknowledged)
    return delays


async def churn(client, sidecar: Sidecar, etcd_pid: int, total: int, rate: float, seconds: float) -> dict[str, float]:
    leases = await grant_leases(client)
    cpu0, etcd0, wall0 = cpu_seconds(sidecar.pid), cpu_seconds(etcd_pid), time.perf_counter()
    sent = 0
    while time.perf_counter() - wall0 < seconds:
        i = random.randrange(total)
        await client.put(agent(i).key("").encode(), agent(i, 1000 + sent).to_bytes(), lease=leases[sent % 4])
        sent += 1
        next_at = wall0 + sent / rate
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    wall = time.perf_counter() - wall0
    await asyncio.sleep(1.0)  # let the daemon finish the last events
    cpu = cpu_seconds(sidecar.pid) - cpu0
    etcd_cpu = cpu_seconds(etcd_pid) - etcd0
    return {"changes": sent, "seconds": round(wall, 2), "changes_per_s": round(sent / wall, 1),
            "sidecar_cpu_pct": round(100 * cpu / (wall + 1.0), 1),
            "sidecar_cpu_ms_per_change": round(1000 * cpu / sent, 2),
            "etcd_cpu_pct": round(100 * etcd_cpu / (wall + 1.0), 1), "rss_mb_after": round(rss_mb(sidecar.pid), 1)}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="0,10000,50000,100000")
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    levels = [int(v) for v in args.levels.split(",")]
    etcd = EmbeddedEtcd("scale")
    etcd.start()
    assert etcd.process is not None
    results: dict[str, object] = {"machine": machine(), "levels": []}
    sidecar: Sidecar | None = None
    try:
        async with etcd_client(etcd.endpoint) as client:
            leases = await grant_leases(client)
            loaded = 0
            for level in levels:
                if level > loaded:
                    phase(f"loading agents {loaded}..{level}")
                    seconds = await load(client, loaded, level, leases)
                    phase(f"loaded {level - loaded} agents in {seconds:.2f} s")
                    loaded = level
                if sidecar is not None:
                    sidecar.stop()
                gc.collect()
                phase(f"sidecar with {level} agents")
                sidecar = Sidecar(etcd.endpoint).start()
                await asyncio.sleep(3.0)
                row = {"agents": level, "ready_s": round(sidecar.ready_s, 3), "rss_mb": round(rss_mb(sidecar.pid), 1),
                       "etcd_rss_mb": round(rss_mb(etcd.process.pid), 1)}
                phase(str(row))
                results["levels"].append(row)  # type: ignore[attr-defined]
            assert sidecar is not None
            phase(f"propagation via DNS at {loaded} agents")
            dns_delays = await propagation(client, sidecar, args.changes, loaded, "dns", 1)
            phase(f"propagation via /v1/agents at {loaded} agents")
            admin_delays = await propagation(client, sidecar, args.changes, loaded, "admin", 500)
            results["propagation"] = {
                "agents": loaded,
                "dns_p50_ms": round(pct(dns_delays, 0.5) * 1e3, 1), "dns_p99_ms": round(pct(dns_delays, 0.99) * 1e3, 1),
                "dns_max_ms": round(max(dns_delays) * 1e3, 1),
                "admin_p50_ms": round(pct(admin_delays, 0.5) * 1e3, 1),
                "admin_p99_ms": round(pct(admin_delays, 0.99) * 1e3, 1), "count": args.changes}
            phase(str(results["propagation"]))
            phase(f"churn: {args.rate}/s for {args.seconds} s")
            results["churn"] = await churn(client, sidecar, etcd.process.pid, loaded, args.rate, args.seconds)
            phase(str(results["churn"]))
    finally:
        if sidecar is not None:
            sidecar.stop()
        etcd.cleanup()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
