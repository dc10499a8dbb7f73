"""Registry benchmark: registration bursts, single registrations, propagation, RSS, time to ready.

Usage: python bench/registry/run.py [--burst 1000 --burst 10000] [--singles 500] [--propagation 200]

Starts a private etcd on tmpfs (loopback, free ports). The peer in the same run
is the raw aetcd client doing the same lease grant + put with no sidecar code
around it: the floor our registration path can reach on this machine.
Propagation is measured in another process: a real `sidecar run`, observed
through its /v1/watch stream (registration acknowledged -> upsert event seen).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import aetcd

from sidecar.dev import EmbeddedEtcd, free_port
from sidecar.metrics import Metrics
from sidecar.model import parse_agent
from sidecar.registry.etcd import EtcdClient
from sidecar.registry.lease import LeaseKeeper


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def agent(i: int, cap: str = "bench", ttl: str = "60s"):
    return parse_agent({"id": f"a{i}", "name": "bench", "address": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
                        "port": 8000 + i % 1000, "capabilities": [cap, f"c{i % 100}"], "tags": ["t1", "t2"],
                        "metadata": {"model": "m", "i": str(i)}, "ttl": ttl})


async def burst(keeper: LeaseKeeper, count: int, cap: str, base: int) -> dict[str, float]:
    times: list[float] = []
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            await keeper.register(agent(i, cap))
        except Exception:
            errors += 1
            return
        times.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(base + i) for i in range(count)))
    total = time.perf_counter() - started
    return {"count": count, "total_s": total, "errors": errors, "p50_ms": pct(times, 0.5) * 1e3,
            "p99_ms": pct(times, 0.99) * 1e3}


async def raw_burst(endpoint: str, count: int, prefix: str) -> dict[str, float]:
    host, port = endpoint.removeprefix("http://").split(":")
    times: list[float] = []
    # The same bound on in-flight calls as EtcdClient (256): unbounded, 10,000 at once get
    # "etcdserver: too many requests" from etcd.
    limit = asyncio.Semaphore(256)
    async with aetcd.Client(host=host, port=int(port), timeout=10) as client:
        async def one(i: int) -> None:
            started = time.perf_counter()
            async with limit:
                lease = await client.lease(60)
            async with limit:
                await client.put(f"{prefix}/{i}".encode(), agent(i).to_bytes(), lease=lease)
            times.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        total = time.perf_counter() - started
        await client.delete_prefix(prefix.encode())
    return {"count": count, "total_s": total, "p50_ms": pct(times, 0.5) * 1e3, "p99_ms": pct(times, 0.99) * 1e3}


async def singles(keeper: LeaseKeeper, count: int) -> dict[str, float]:
    times = []
    for i in range(count):
        started = time.perf_counter()
        registration = await keeper.register(agent(500_000 + i, "single"))
        times.append(time.perf_counter() - started)
        await registration.close()
    return {"count": count, "p50_ms": pct(times, 0.5) * 1e3, "p99_ms": pct(times, 0.99) * 1e3}


async def raw_singles(endpoint: str, count: int) -> dict[str, float]:
    host, port = endpoint.removeprefix("http://").split(":")
    times = []
    async with aetcd.Client(host=host, port=int(port), timeout=10) as client:
        for i in range(count):
            started = time.perf_counter()
            lease = await client.lease(60)
            await client.put(f"/raw-single/{i}".encode(), b"x", lease=lease)
            times.append(time.perf_counter() - started)
            await client.revoke_lease(lease.id)
    return {"count": count, "p50_ms": pct(times, 0.5) * 1e3, "p99_ms": pct(times, 0.99) * 1e3}


def start_sidecar(endpoint: str) -> tuple[subprocess.Popen[bytes], int, float]:
    admin = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--etcd-endpoints", endpoint, "--admin-listen", f"127.0.0.1:{admin}",
         "--dns-listen", f"127.0.0.1:{free_port()}", "--proxy-listen", f"127.0.0.1:{free_port()}",
         "--grpc-listen", f"127.0.0.1:{free_port()}", "--upstream-dns", "none", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as response:
                if response.status == 200:
                    return process, admin, time.perf_counter() - started
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("sidecar exited") from None
        time.sleep(0.005)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def propagation(keeper: LeaseKeeper, admin: int, count: int) -> dict[str, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin, limit=64 * 1024 * 1024)
    writer.write(b"GET /v1/watch HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    seen: dict[str, asyncio.Future[float]] = {}

    async def read_events() -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            if line.startswith(b"data: "):
                data = json.loads(line[6:])
                agent_json = data.get("agent")
                if agent_json and agent_json["id"] in seen and not seen[agent_json["id"]].done():
                    seen[agent_json["id"]].set_result(time.perf_counter())

    task = asyncio.create_task(read_events())
    await asyncio.sleep(0.5)
    times = []
    loop = asyncio.get_running_loop()
    for i in range(count):
        record = agent(600_000 + i, "propagation")
        seen[record.id] = loop.create_future()
        registration = await keeper.register(record)
        acknowledged = time.perf_counter()
        arrived = await asyncio.wait_for(seen[record.id], 10)
        times.append(max(0.0, arrived - acknowledged))
        await registration.close()
    task.cancel()
    writer.close()
    return {"count": count, "p50_ms": pct(times, 0.5) * 1e3, "p99_ms": pct(times, 0.99) * 1e3}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--burst", type=int, action="append")
    parser.add_argument("--singles", type=int, default=500)
    parser.add_argument("--propagation", type=int, default=200)
    args = parser.parse_args()
    bursts = args.burst or [1000, 10000]
    etcd = EmbeddedEtcd("bench")
    etcd.start()
    results: dict[str, object] = {}
    try:
        metrics = Metrics()
        client = EtcdClient([etcd.endpoint], timeout=10)
        keeper = LeaseKeeper(client, "", metrics.registry)
        for count in bursts:
            phase(f"raw burst of {count}")
            results[f"raw_burst_{count}"] = await raw_burst(etcd.endpoint, count, f"/raw-burst-{count}")
            phase(f"sidecar burst of {count}")
            results[f"burst_{count}"] = await burst(keeper, count, f"burst{count}", base=count * 10)
            if count != max(bursts):
                await keeper.close()
        phase("single registrations")
        results["raw_single"] = await raw_singles(etcd.endpoint, args.singles)
        results["single"] = await singles(keeper, args.singles)
        # The largest burst is still registered: start a sidecar process that must hold it.
        held = len(keeper.registrations)
        phase(f"sidecar process with {held} agents")
        process, admin, ready_s = start_sidecar(etcd.endpoint)
        try:
            results["ready_with_agents"] = {"agents": held, "ready_s": ready_s}
            await asyncio.sleep(1.0)
            results["rss_with_agents"] = {"agents": held, "rss_mb": rss_mb(process.pid)}
            phase("propagation")
            results["propagation"] = await propagation(keeper, admin, args.propagation)
        finally:
            process.terminate()
            process.wait()
        phase("closing")
        await keeper.close()
        await client.close()
        phase("empty sidecar")
        process, admin, ready_empty = start_sidecar(etcd.endpoint)
        await asyncio.sleep(1.0)
        results["empty_sidecar"] = {"ready_s": ready_empty, "rss_mb": rss_mb(process.pid)}
        process.terminate()
        process.wait()
    finally:
        etcd.cleanup()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.pop("HTTP_PROXY", None)
    asyncio.run(main())
