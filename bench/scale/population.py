"""What the scale benchmarks share: the agent population, a bulk loader, and `sidecar run` children.

The population: agent ``i`` has name ``svc{i % 1000}``, capabilities ``c{i % 1000}``
(100 agents each at 100,000) and ``g{i % 10}`` (10,000 each at 100,000), two
tags and two metadata keys: about 400 bytes of JSON, like a real registration.

The loader writes agents with raw aetcd transactions of 128 puts (etcd's default
``--max-txn-ops``) on a few shared leases, 8 transactions in flight: 100,000
agents in seconds, where one lease grant + put per agent would take minutes.
"""

from __future__ import annotations

import asyncio
import os

# The benchmarks fork `sidecar run` children while their own aetcd (gRPC aio) clients are open; with
# gRPC's fork handlers on, a client made before the children stalled. The children get it unset.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import aetcd

from sidecar.dev import free_port
from sidecar.model import Agent, parse_agent

TXN_OPS = 128
LEASES = 4


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def agent(i: int, generation: int = 0) -> Agent:
    """Agent ``i``; a new ``generation`` changes its address and port (so DNS answers change)."""
    host = i + generation * 7919
    return parse_agent({"id": f"a{i}", "name": f"svc{i % 1000}",
                        "address": f"10.{host // 65536 % 256}.{host // 256 % 256}.{host % 256}",
                        "port": 8000 + (i + generation) % 1000, "capabilities": [f"c{i % 1000}", f"g{i % 10}"],
                        "tags": ["t1", f"zone{i % 3}"], "metadata": {"model": "m", "i": str(i)}, "ttl": "600s",
                        "version": "1.0.0"})


def etcd_client(endpoint: str) -> aetcd.Client:
    host, port = endpoint.removeprefix("http://").split(":")
    return aetcd.Client(host=host, port=int(port), timeout=30,
                        options={"grpc.max_receive_message_length": 256 * 1024 * 1024})


async def load(client: aetcd.Client, start: int, stop: int, leases: list[int], in_flight: int = 8) -> float:
    """Put agents ``start..stop-1`` in transactions of TXN_OPS on ``leases``; returns the seconds it took."""
    limit = asyncio.Semaphore(in_flight)

    async def batch(first: int) -> None:
        ops = [client.transactions.put(agent(i).key("").encode(), agent(i).to_bytes(),
                                       lease=leases[i % len(leases)])
               for i in range(first, min(first + TXN_OPS, stop))]
        async with limit:
            await client.transaction(compare=[], success=ops, failure=[])

    started = time.perf_counter()
    await asyncio.gather(*(batch(first) for first in range(start, stop, TXN_OPS)))
    return time.perf_counter() - started


async def grant_leases(client: aetcd.Client, ttl: int = 3600) -> list[int]:
    """LEASES long leases (nobody keeps them alive: the benchmarks are shorter than ``ttl``)."""
    return [(await client.lease(ttl)).id for _ in range(LEASES)]


@dataclass
class Sidecar:
    """One `sidecar run` child on free loopback ports; ``ready_s`` is spawn -> /readyz 200."""

    endpoint: str
    admin: int = field(default_factory=free_port)
    dns: int = field(default_factory=free_port)
    proxy: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    ready_s: float = 0.0
    extra: tuple[str, ...] = ()
    # What runs `sidecar run` (bench/soak/subject.py replaces it); the listener flags are appended.
    command: tuple[str, ...] = (sys.executable, "-m", "sidecar", "run")
    log: str | None = None  # where the child's stderr (its warnings) goes; nowhere by default

    def start(self, wait: bool = True) -> Sidecar:
        env = dict(os.environ)
        env.pop("HTTP_PROXY", None)
        env.pop("GRPC_ENABLE_FORK_SUPPORT", None)
        self._started = time.perf_counter()
        self.process = subprocess.Popen(
            [*self.command, "--etcd-endpoints", self.endpoint,
             "--admin-listen", f"127.0.0.1:{self.admin}", "--dns-listen", f"127.0.0.1:{self.dns}",
             "--proxy-listen", f"127.0.0.1:{self.proxy}", "--grpc-listen", f"127.0.0.1:{free_port()}",
             "--upstream-dns", "none", "--log-level", "warning", *self.extra],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab") if self.log else subprocess.DEVNULL,
            env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 300.0, attempts: int = 3) -> float:
        """Wait for /readyz; a child that exits at start (a free port taken meanwhile) is started again on
        new ports, ``attempts`` times in all."""
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=2) as response:
                    if response.status == 200:
                        self.ready_s = time.perf_counter() - self._started
                        return self.ready_s
            except OSError:
                if self.process.poll() is not None:
                    if attempts > 1:
                        self.admin, self.dns, self.proxy = free_port(), free_port(), free_port()
                        self.start(wait=False)
                        return self.wait_ready(timeout, attempts - 1)
                    raise RuntimeError(f"sidecar exited with {self.process.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("sidecar did not become ready") from None
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def etcd_watches(endpoint: str) -> dict[str, int]:
    """etcd's own count of watch streams and watchers (its /metrics), i.e. what the watchers cost it."""
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = {"etcd_debugging_mvcc_watch_stream_total": "etcd_watch_streams",
              "etcd_debugging_mvcc_watcher_total": "etcd_watchers"}
    return {wanted[name]: int(float(value)) for name, _, value in
            (line.partition(" ") for line in text.splitlines()) if name in wanted}


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (resident pages from /proc/PID/statm)."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, object]:
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "nproc": os.cpu_count(), "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
