"""The sidecar's ProxyServer alone (no etcd), over a catalog of agents given on the command line.

    python bench/proxy/serve.py --port 15101 --agent 127.0.0.1:18001 --agent ... \
        [--algorithm round_robin] [--sticky] [--otlp-endpoint URL --sample-ratio 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop

from sidecar.catalog import Catalog, Reset
from sidecar.config import Settings, build
from sidecar.metrics import Metrics
from sidecar.model import Agent
from sidecar.proxy.server import ProxyServer
from sidecar.tracing import Tracing


async def main(args: argparse.Namespace) -> None:
    agents = {}
    for i, target in enumerate(args.agent):
        host, port = target.rsplit(":", 1)
        agents[f"/services/bench/a{i}"] = Agent(id=f"a{i}", name="bench", address=host, port=int(port),
                                                capabilities=("chat",))
    catalog = Catalog()
    catalog.apply([Reset(1, agents)])
    settings = build(Settings, {
        "proxy": {"listen": f"127.0.0.1:{args.port}"},
        "load_balancer": {"algorithm": args.algorithm},
        "sticky": {"enabled": args.sticky},
        "tracing": {"otlp_endpoint": args.otlp_endpoint, "sample_ratio": args.sample_ratio},
    })
    proxy = ProxyServer(settings, catalog, Metrics().proxy, tracing=Tracing.build(settings.tracing))
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await proxy.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--agent", action="append", required=True)
    parser.add_argument("--algorithm", default="round_robin")
    parser.add_argument("--sticky", action="store_true")
    parser.add_argument("--otlp-endpoint", default="", help="tracing on, spans exported there")
    parser.add_argument("--sample-ratio", type=float, default=0.01)
    uvloop.run(main(parser.parse_args()))
