"""Dynamic configuration: time from `sidecar config set` to applied in another sidecar.

Usage: python bench/config/run.py [--changes 20]

Starts a private etcd and two real `sidecar run` daemons at their defaults.
Each round writes a new document the way `sidecar config set` does (validate,
compare-and-swap on the version read) through the first sidecar's etcd, then
polls the second sidecar's `GET /v1/config` every millisecond until it reports
that version (the poll adds up to ~1 ms). The documents alternate the load
balancer, the breaker threshold and the DNS TTL, so every round is a real
change applied to the proxy and DNS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request

from sidecar.dev import EmbeddedEtcd, free_port
from sidecar.dynamic import read_document, write_document
from sidecar.registry.etcd import EtcdClient


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_sidecar(endpoint: str) -> tuple[subprocess.Popen[bytes], int]:
    admin = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--etcd-endpoints", endpoint, "--admin-listen", f"127.0.0.1:{admin}",
         "--dns-listen", f"127.0.0.1:{free_port()}", "--proxy-listen", f"127.0.0.1:{free_port()}",
         "--grpc-listen", f"127.0.0.1:{free_port()}", "--upstream-dns", "none", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as response:
                if response.status == 200:
                    return process, admin
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("sidecar did not become ready") from None
        time.sleep(0.01)


def version_of(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/v1/config", timeout=2) as response:
        return int(json.loads(response.read())["version"])


async def measure(endpoint: str, admin: int, changes: int) -> list[float]:
    client = EtcdClient([endpoint], timeout=5)
    delays = []
    algorithms = ("round_robin", "least_conn", "p2c_ewma", "weighted_random")
    try:
        for i in range(changes):
            document = {"load_balancer": {"algorithm": algorithms[i % 4],
                                          "circuit_breaker": {"failure_threshold": 3 + i % 5}},
                        "dns": {"ttl": 5 + i}}
            expected, _ = await read_document(client, "")
            started = time.perf_counter()
            version = await write_document(client, "", document, expected)
            while await asyncio.to_thread(version_of, admin) < version:  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.001)
            delays.append(time.perf_counter() - started)
    finally:
        await client.close()
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args()
    etcd = EmbeddedEtcd(name="bench-config")
    etcd.start()
    processes = []
    try:
        processes = [start_sidecar(etcd.endpoint) for _ in range(2)]
        delays = asyncio.run(measure(etcd.endpoint, processes[1][1], args.changes))
        result = {"changes": len(delays), "p50_ms": round(pct(delays, 0.5) * 1000, 1),
                  "p99_ms": round(pct(delays, 0.99) * 1000, 1), "max_ms": round(max(delays) * 1000, 1)}
        print(json.dumps(result))
    finally:
        for process, _ in processes:
            process.terminate()
            process.wait(30)
        etcd.cleanup()


if __name__ == "__main__":
    main()
