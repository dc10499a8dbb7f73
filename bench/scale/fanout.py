"""Watch fan-out to 1000 watchers, simulated: raw etcd watch streams, each on its own connection.

Usage: python bench/scale/fanout.py [--watchers 1000] [--workers 4] [--puts 20] [--rate 50 --seconds 10]

What a `sidecar run` costs etcd is one gRPC connection with one watch on
`/services/` (plus lease keepalives when it registers an agent). 1000 daemons
do not fit on this machine, so ``--workers`` processes each open
``watchers / workers`` aetcd clients (a local subchannel pool each: one TCP
connection per client, as separate daemons would have) with one prefix watch
each, and record when every event arrives. The parent puts a key
(timed from before the put is sent) and computes put -> seen by each watcher and by all of them,
then writes ``--rate`` puts per second for ``--seconds`` and reads the CPU of
etcd, of the proxy and of the workers. Done against etcd directly and through
`etcd grpc-proxy start` (``--modes``). The workers' Python decoding is part of
the latency measured (each worker holds 250 streams on a shared core), so these
are upper bounds on what etcd adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import aetcd
from population import cpu_seconds, etcd_client, etcd_watches, machine, pct, phase, rss_mb  # type: ignore[import-not-found]
from watchers import GrpcProxy  # type: ignore[import-not-found]

from sidecar.dev import EmbeddedEtcd

PREFIX = b"/fanout/"


async def worker(endpoint: str, count: int) -> None:
    host, port = endpoint.removeprefix("http://").split(":")
    arrivals: dict[str, list[float]] = {}
    clients = [aetcd.Client(host=host, port=int(port), timeout=30, options={"grpc.use_local_subchannel_pool": 1})
               for _ in range(count)]

    async def follow(client: aetcd.Client) -> None:
        watch = await client.watch_prefix(PREFIX)
        async for event in watch:
            arrivals.setdefault(event.kv.key.decode(), []).append(time.time())

    tasks = []
    for client in clients:
        await client.connect()
        tasks.append(asyncio.create_task(follow(client)))
    await asyncio.sleep(2.0)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in tasks:
        task.cancel()
    print(json.dumps(arrivals), flush=True)


def spawn(endpoint: str, per_worker: int, count: int) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen([sys.executable, __file__, "--worker", endpoint, "--count", str(per_worker)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(count)]


async def measure(endpoint: str, etcd_pid: int, proxy_pid: int | None, args: argparse.Namespace) -> dict[str, float]:
    per_worker = args.watchers // args.workers
    workers = spawn(endpoint, per_worker, args.workers)
    try:
        for process in workers:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("a worker did not start")
        rss = sum(rss_mb(p.pid) for p in workers)
        watches = etcd_watches(args.etcd)
        acknowledged: dict[str, float] = {}
        async with etcd_client(args.etcd) as client:
            for n in range(args.puts):
                key = f"{PREFIX.decode()}probe{n}"
                acknowledged[key] = time.time()  # before the put: a watcher may see it before its reply
                await client.put(key.encode(), b"x" * 400)
                await asyncio.sleep(0.3)
            pids = {"etcd": [etcd_pid], "workers": [p.pid for p in workers]}
            if proxy_pid:
                pids["grpc_proxy"] = [proxy_pid]
            before = {name: sum(cpu_seconds(p) for p in group) for name, group in pids.items()}
            started = time.perf_counter()
            sent = 0
            while time.perf_counter() - started < args.seconds:
                await client.put(f"{PREFIX.decode()}churn{sent % 100}".encode(), b"y" * 400)
                sent += 1
                await asyncio.sleep(max(0.0, started + sent / args.rate - time.perf_counter()))
            wall = time.perf_counter() - started
            cpu = {f"{name}_cpu_pct": round(100 * (sum(cpu_seconds(p) for p in group) - before[name]) / wall, 1)
                   for name, group in pids.items()}
        await asyncio.sleep(1.0)
        arrivals: dict[str, list[float]] = {}
        for process in workers:
            out, _ = process.communicate("", timeout=60)
            for key, times in json.loads(out.strip().splitlines()[-1]).items():
                arrivals.setdefault(key, []).extend(times)
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    each, alls, missing = [], [], 0
    for key, sent_at in acknowledged.items():
        got = [t - sent_at for t in arrivals.get(key, [])]
        missing += args.watchers - len(got)
        each.extend(got)
        if got:
            alls.append(max(got))
    return {"watchers": per_worker * args.workers, "missing_deliveries": missing,
            "each_p50_ms": round(pct(each, 0.5) * 1e3, 1), "each_p99_ms": round(pct(each, 0.99) * 1e3, 1),
            "all_p50_ms": round(pct(alls, 0.5) * 1e3, 1), "all_max_ms": round(max(alls) * 1e3, 1),
            "changes_per_s": round(sent / wall, 1), **cpu, **watches, "workers_rss_mb": round(rss, 1)}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--puts", type=int, default=20)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", default="direct,grpc-proxy")
    parser.add_argument("--worker")
    parser.add_argument("--count", type=int)
    args = parser.parse_args()
    if args.worker:
        await worker(args.worker, args.count)
        return
    etcd = EmbeddedEtcd("scale-fanout")
    etcd.start()
    assert etcd.process is not None
    args.etcd = etcd.endpoint
    results: dict[str, object] = {"machine": machine(), "rows": []}
    try:
        for mode in args.modes.split(","):
            proxy = GrpcProxy(etcd.endpoint) if mode == "grpc-proxy" else None
            try:
                phase(f"{mode}: {args.watchers} watchers")
                row = {"mode": mode, **await measure(proxy.endpoint if proxy else etcd.endpoint, etcd.process.pid,
                                                     proxy.process.pid if proxy else None, args)}
                row["etcd_rss_mb"] = round(rss_mb(etcd.process.pid), 1)
                phase(str(row))
                results["rows"].append(row)  # type: ignore[attr-defined]
            finally:
                if proxy:
                    proxy.stop()
    finally:
        etcd.cleanup()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
