"""Many watching `sidecar run` daemons against one etcd, with and without `etcd grpc-proxy`.

Usage: python bench/scale/watchers.py [--counts 10,20,40] [--puts 20] [--agents 1000] [--rate 50 --seconds 10]

A private etcd on tmpfs holding ``--agents`` agents. For each mode (``direct``:
every daemon on etcd; ``grpc-proxy``: every daemon on one `etcd grpc-proxy
start`, which coalesces identical watches into one etcd watch) the daemons are
started up to each count. The benchmark reads every daemon's `/v1/watch` SSE
stream; a fan-out round is one put of a changed agent (written to etcd
directly, acknowledged) -> the upsert read from every stream: p50 over the
daemons and the time until all had it. Then ``--rate`` changes per second for
``--seconds``: CPU of etcd, of the proxy and of all daemons together.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import tempfile
import time

from population import (  # type: ignore[import-not-found]
    Sidecar,
    agent,
    cpu_seconds,
    etcd_client,
    etcd_watches,
    grant_leases,
    load,
    machine,
    pct,
    phase,
    rss_mb,
)

from sidecar.dev import EmbeddedEtcd, free_port


class GrpcProxy:
    """`etcd grpc-proxy start` on a free port, in front of one etcd."""

    def __init__(self, etcd_endpoint: str) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="scale-grpc-proxy-", dir="/dev/shm")
        binary = shutil.which("etcd")
        assert binary is not None
        self.process = subprocess.Popen(
            [binary, "grpc-proxy", "start", "--endpoints", etcd_endpoint.removeprefix("http://"),
             "--listen-addr", f"127.0.0.1:{self.port}", "--data-dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "log"), "wb"))
        time.sleep(1.0)
        assert self.process.poll() is None, "grpc-proxy exited"
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Stream:
    """One daemon's /v1/watch SSE stream; ``seen`` maps (id, address) to the arrival time."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.seen: dict[tuple[str, str], float] = {}
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.sidecar.admin, limit=64 * 1024 * 1024)
        writer.write(b"GET /v1/watch HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        self.writer = writer

        async def read() -> None:
            while line := await reader.readline():
                # Upserts only: a daemon that drops this stream as too slow sends a SNAPSHOT instead,
                # and that round counts as missed for it.
                if line.startswith(b"data: ") and b'"agent":' in line:
                    body = json.loads(line[6:])["agent"]
                    self.seen.setdefault((body["id"], body["address"]), time.perf_counter())

        self.task = asyncio.create_task(read())

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writer.close()


async def fanout(endpoint: str, streams: list[Stream], puts: int, total: int, generation: int) -> dict[str, float]:
    async with etcd_client(endpoint) as client:
        return await _fanout(client, streams, puts, total, generation)


async def _fanout(client, streams: list[Stream], puts: int, total: int, generation: int) -> dict[str, float]:
    leases = await grant_leases(client)
    each: list[float] = []
    alls: list[float] = []
    missed = 0
    for n in range(puts):
        i = random.randrange(total)
        changed = agent(i, generation + n)
        acknowledged = time.perf_counter()  # taken before the put: the event can be read before its reply
        await client.put(changed.key("").encode(), changed.to_bytes(), lease=leases[0])
        wanted = (changed.id, changed.address)
        deadline = acknowledged + 10
        # Polled every ms: one Event per stream and put would measure the same within that ms.
        while not all(wanted in s.seen for s in streams) and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        missed += sum(wanted not in s.seen for s in streams)
        arrivals = [s.seen.get(wanted, deadline) - acknowledged for s in streams]
        each.extend(arrivals)
        alls.append(max(arrivals))
        await asyncio.sleep(0.2)
    return {"missed_10s": missed, "each_p50_ms": round(pct(each, 0.5) * 1e3, 1),
            "each_p99_ms": round(pct(each, 0.99) * 1e3, 1),
            "all_p50_ms": round(pct(alls, 0.5) * 1e3, 1), "all_max_ms": round(max(alls) * 1e3, 1)}


async def churn_cpu(endpoint: str, pids: dict[str, list[int]], total: int, rate: float,
                    seconds: float) -> dict[str, float]:
    async with etcd_client(endpoint) as client:
        return await _churn_cpu(client, pids, total, rate, seconds)


async def _churn_cpu(client, pids: dict[str, list[int]], total: int, rate: float, seconds: float) -> dict[str, float]:
    leases = await grant_leases(client)
    before = {name: sum(cpu_seconds(p) for p in group) for name, group in pids.items()}
    started = time.perf_counter()
    sent = 0
    while time.perf_counter() - started < seconds:
        i = random.randrange(total)
        await client.put(agent(i).key("").encode(), agent(i, 5000 + sent).to_bytes(), lease=leases[sent % 4])
        sent += 1
        await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
    wall = time.perf_counter() - started
    return {"changes_per_s": round(sent / wall, 1),
            **{f"{name}_cpu_pct": round(100 * (sum(cpu_seconds(p) for p in group) - before[name]) / wall, 1)
               for name, group in pids.items()}}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default="10,20,40")
    parser.add_argument("--puts", type=int, default=20)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", default="direct,grpc-proxy")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    etcd = EmbeddedEtcd("scale-watch")
    etcd.start()
    assert etcd.process is not None
    results: dict[str, object] = {"machine": machine(), "agents": args.agents, "rows": []}
    sidecars: list[Sidecar] = []
    streams: list[Stream] = []
    proxy: GrpcProxy | None = None
    try:
        # One etcd client per phase: a gRPC channel made before the daemons were forked hung here.
        async with etcd_client(etcd.endpoint) as client:
            await load(client, 0, args.agents, await grant_leases(client))
        for mode in args.modes.split(","):
            proxy = GrpcProxy(etcd.endpoint) if mode == "grpc-proxy" else None
            target = proxy.endpoint if proxy else etcd.endpoint
            for count in counts:
                phase(f"{mode}: starting daemons up to {count}")
                fresh = [Sidecar(target).start(wait=False) for _ in range(count - len(sidecars))]
                sidecars.extend(fresh)  # before waiting: an interrupted start still stops them
                for sidecar in fresh:
                    sidecar.wait_ready()
                    stream = Stream(sidecar)
                    await stream.open()
                    streams.append(stream)
                await asyncio.sleep(2.0)
                row: dict[str, object] = {"mode": mode, "sidecars": count}
                row.update(await fanout(etcd.endpoint, streams, args.puts, args.agents, 100 * count))
                pids = {"etcd": [etcd.process.pid], "sidecars": [s.pid for s in sidecars]}
                if proxy:
                    pids["grpc_proxy"] = [proxy.process.pid]
                row.update(await churn_cpu(etcd.endpoint, pids, args.agents, args.rate, args.seconds))
                row["sidecar_rss_mb_each"] = round(sum(rss_mb(s.pid) for s in sidecars) / count, 1)
                row["etcd_rss_mb"] = round(rss_mb(etcd.process.pid), 1)
                row.update(etcd_watches(etcd.endpoint))
                phase(str(row))
                results["rows"].append(row)  # type: ignore[attr-defined]
            for stream in streams:
                stream.close()
            for sidecar in sidecars:
                sidecar.stop()
            streams, sidecars = [], []
            if proxy:
                proxy.stop()
                proxy = None
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        if proxy:
            proxy.stop()
        etcd.cleanup()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
