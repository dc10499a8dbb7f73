"""A standalone sidecar DNS server over a generated catalog (no etcd), for dnsperf.

    python bench/dns/serve.py --caps 100 --per-cap 3 --port 0 --loop uvloop [--upstream 127.0.0.1:5300] [--cache-size 0]

Prints ``port <n>`` once listening; runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from sidecar.catalog import Catalog, Reset
from sidecar.config import DnsSettings
from sidecar.dns import DnsServer
from sidecar.metrics import Metrics
from sidecar.model import Agent, parse_agent


def bench_agents(caps: int, per_cap: int) -> dict[str, Agent]:
    """``caps`` capabilities cap0..capN-1, each with ``per_cap`` agents on 10.x.y.z (the same set dnsmasq gets)."""
    agents = {}
    for c in range(caps):
        for a in range(per_cap):
            n = c * per_cap + a
            address = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
            agent = parse_agent({"id": f"a{n}", "name": f"svc{c}", "address": address, "port": 8000 + a,
                                 "capabilities": [f"cap{c}"]})
            agents[agent.key("")] = agent
    return agents


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--caps", type=int, default=100)
    parser.add_argument("--per-cap", type=int, default=3)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", default="none")
    parser.add_argument("--cache-size", type=int, default=DnsSettings.cache_size)
    args = parser.parse_args()
    catalog = Catalog()
    catalog.apply([Reset(1, bench_agents(args.caps, args.per_cap))])
    settings = DnsSettings(listen=f"127.0.0.1:{args.port}", upstreams=(args.upstream,), cache_size=args.cache_size)
    server = DnsServer(settings, catalog, Metrics().dns)
    await server.start()
    print(f"port {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


if __name__ == "__main__":
    import sys

    if "--loop=asyncio" in sys.argv:
        sys.argv.remove("--loop=asyncio")
        asyncio.run(main())
    else:
        import uvloop

        uvloop.run(main())
