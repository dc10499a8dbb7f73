"""Load that checks every answer: DNS queries, proxy requests, registration churn.

A DNS answer counts as good only when it is NOERROR with exactly the expected
number of A records, so an agent flapping out of the answers is a failed answer,
not just a missing one. Only the response header is read (rcode, ANCOUNT), which
keeps a Python client at thousands of queries a second.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import re
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from dnslib import DNSRecord

from .fleet import agent_body, deregister, register


@dataclass
class Tally:
    """Good and failed operations, with a count per failure reason and the first failures' times."""

    ok: int = 0
    failed: int = 0
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    first_failures: list[tuple[float, str]] = field(default_factory=list)

    def good(self) -> None:
        self.ok += 1

    def bad(self, reason: str) -> None:
        self.failed += 1
        self.reasons[reason] += 1
        if len(self.first_failures) < 20:
            self.first_failures.append((time.monotonic(), reason))

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def merge(self, other: Tally) -> Tally:
        merged = Tally(self.ok + other.ok, self.failed + other.failed, self.reasons + other.reasons)
        merged.first_failures = (self.first_failures + other.first_failures)[:20]
        return merged

    def __str__(self) -> str:
        share = 100.0 * self.ok / self.total if self.total else 100.0
        return f"{self.ok}/{self.total} good ({share:.3f}%), failures {dict(self.reasons)}"


class DnsLoad(asyncio.DatagramProtocol):
    """``qps`` A queries for ``name`` at ``host:port``; good = NOERROR with ``answers`` records."""

    def __init__(self, host: str, port: int, name: str, answers: int, qps: int, timeout: float = 2.0) -> None:
        self.address = (host, port)
        self.query = bytearray(DNSRecord.question(name, "A").pack())
        self.answers = answers
        self.qps = qps
        self.timeout = timeout
        self.tally = Tally()
        self._pending: dict[int, float] = {}
        self._next_id = random.randrange(65536)
        self._transport: asyncio.DatagramTransport | None = None
        # Replies the kernel dropped at this client's socket (its receive buffer full): the client's loss.
        self.socket_drops = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 12:
            return
        query_id, flags, _, count = struct.unpack("!HHHH", data[:8])
        if self._pending.pop(query_id, None) is None:
            return
        if flags & 0x000F:
            self.tally.bad(f"rcode {flags & 0x000F}")
        elif count != self.answers:
            self.tally.bad(f"{count} of {self.answers} answers")
        else:
            self.tally.good()

    def error_received(self, exc: Exception) -> None:
        self.tally.bad(type(exc).__name__)

    def _expire(self, now: float) -> None:
        late = [qid for qid, sent in self._pending.items() if now - sent > self.timeout]
        for qid in late:
            del self._pending[qid]
            self.tally.bad("timeout")

    async def run(self, stop: asyncio.Event) -> Tally:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(lambda: self, remote_addr=self.address)
        started, sent = loop.time(), 0
        try:
            while not stop.is_set():
                now = loop.time()
                due = int((now - started) * self.qps) - sent
                for _ in range(min(due, 1000)):
                    self._next_id = (self._next_id + 1) & 0xFFFF
                    struct.pack_into("!H", self.query, 0, self._next_id)
                    self._pending[self._next_id] = now
                    self._transport.sendto(bytes(self.query))
                sent += max(due, 0)
                self._expire(now)
                await asyncio.sleep(0.005)
            # Stragglers: whatever is unanswered after the timeout counts as failed.
            await asyncio.sleep(self.timeout)
            self._expire(loop.time() + self.timeout + 1)
        finally:
            self.socket_drops = socket_drops(self._transport.get_extra_info("socket"))
            self._transport.close()
        return self.tally


class ProxyLoad:
    """``rps`` requests through the proxy at ``host:port`` to ``capability``; good = 200."""

    def __init__(self, host: str, port: int, capability: str, rps: int, timeout: float = 10.0) -> None:
        self.url = f"http://{host}:{port}/chaos"
        self.headers = {"Host": f"{capability}.agents.local"}
        self.rps = rps
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.tally = Tally()
        self.recent: collections.deque[bool] = collections.deque(maxlen=200)

    async def _one(self, http: aiohttp.ClientSession) -> None:
        try:
            async with http.get(self.url, headers=self.headers, timeout=self.timeout) as response:
                await response.read()
                ok = response.status == 200
                reason = f"status {response.status} {response.headers.get('X-Sidecar-Error', '')}".strip()
        except (TimeoutError, aiohttp.ClientError) as exc:
            ok, reason = False, type(exc).__name__
        self.recent.append(ok)
        if ok:
            self.tally.good()
        else:
            self.tally.bad(reason)

    async def run(self, stop: asyncio.Event) -> Tally:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=64, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as http:
            started, sent = loop.time(), 0
            while not stop.is_set():
                due = int((loop.time() - started) * self.rps) - sent
                for _ in range(max(due, 0)):
                    task = loop.create_task(self._one(http))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                sent += max(due, 0)
                await asyncio.sleep(0.01)
            if tasks:
                await asyncio.wait(tasks)
        return self.tally


class Churn:
    """Agents of ``capability`` registered and deregistered through one sidecar's admin API.

    ``expected`` is what must be registered afterwards: every agent whose POST said 201
    (or 202: kept pending by the sidecar while etcd was unreachable, ``accepted``) and whose
    DELETE (if any) was answered; ``pending`` the calls that got neither.
    """

    def __init__(self, admin: str, capability: str, port: int, per_second: float, ttl: str,
                 request_timeout: float = 30) -> None:
        self.admin = admin
        self.capability = capability
        self.port = port
        self.per_second = per_second
        self.ttl = ttl
        self.request_timeout = request_timeout
        self.expected: set[str] = set()
        self.pending: dict[str, tuple[int, str]] = {}
        self.accepted: list[str] = []
        self.tally = Tally()
        self.latencies: list[float] = []
        self._serial = 0

    async def step(self, http: aiohttp.ClientSession) -> None:
        """One registration, and every other time one deregistration."""
        self._serial += 1
        agent_id = f"{self.capability}-{self._serial}"
        started = time.monotonic()
        status, text = await register(http, self.admin, agent_body(agent_id, self.capability, self.port, self.ttl),
                                      self.request_timeout)
        self.latencies.append(time.monotonic() - started)
        if status in (201, 202):
            self.tally.good()
            self.expected.add(agent_id)
            if status == 202:
                self.accepted.append(agent_id)
        else:
            self.tally.bad(f"register {status}")
            self.pending[agent_id] = (status, text[:200])
        if self._serial % 2 == 0 and self.expected:
            victim = sorted(self.expected)[0]
            status, text = await deregister(http, self.admin, victim, self.request_timeout)
            if status in (200, 204):
                self.tally.good()
                self.expected.discard(victim)
            else:
                self.tally.bad(f"deregister {status}")
                self.pending[victim + " (delete)"] = (status, text[:200])

    async def run(self, stop: asyncio.Event) -> Tally:
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                await self.step(http)
                await asyncio.sleep(1 / self.per_second)
        return self.tally


def socket_drops(sock: Any) -> int:
    """The kernel's drop count of one socket (Linux SO_MEMINFO, its ninth field; 0 where unknown)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, 55, 36)
    except (OSError, ValueError):
        return 0
    return int(struct.unpack_from("I", raw, 32)[0]) if len(raw) >= 36 else 0


def process_udp_drops(pid: int) -> int:
    """The kernel's drop counts (/proc/net/udp "drops") summed over the UDP sockets process ``pid`` has open."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone
        return 0
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    drops = 0
    for table in ("udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as handle:
                for line in list(handle)[1:]:
                    fields = line.split()
                    if len(fields) > 12 and fields[9] in inodes:
                        drops += int(fields[12])
        except OSError:
            pass
    return drops


class DnsperfLoad:
    """``qps`` A queries from dnsperf (C, so a rate a Python client cannot reach); good = NOERROR.

    dnsperf checks the response code only; DnsLoad, at a lower rate beside it, checks the answers.
    Queries still in flight when it is stopped are left out of the tally.
    """

    def __init__(self, host: str, port: int, name: str, qps: int, directory: str) -> None:
        # -b: a 4 MiB socket buffer (in KiB; the kernel caps it at net.core.rmem_max). With the default,
        # replies the sidecar sent in a burst after a pause of its loop were dropped at dnsperf's socket.
        self.command = ["dnsperf", "-s", host, "-p", str(port), "-d", "", "-Q", str(qps), "-q", "500",
                        "-l", "100000", "-t", "2", "-b", "4096"]
        self.queries = f"{directory}/dnsperf-{port}.txt"
        self.name = name
        self.tally = Tally()
        self.output = ""
        # Replies the kernel dropped at dnsperf's own sockets (its receive buffer full): the client's loss.
        self.socket_drops = 0

    async def run(self, stop: asyncio.Event) -> Tally:
        with open(self.queries, "w") as handle:  # noqa: ASYNC230 -- one short line
            handle.write(f"{self.name} A\n")
        self.command[self.command.index("-d") + 1] = self.queries
        process = await asyncio.create_subprocess_exec(*self.command, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT)
        assert process.stdout is not None
        reader = asyncio.get_running_loop().create_task(process.stdout.read())
        while not stop.is_set():
            self.socket_drops = max(self.socket_drops, process_udp_drops(process.pid))
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass
        self.socket_drops = max(self.socket_drops, process_udp_drops(process.pid))
        process.send_signal(signal.SIGINT)
        self.output = (await reader).decode(errors="replace")
        await process.wait()
        stats = self.output[self.output.find("Statistics:"):]
        lost = int(re.search(r"Queries lost:\s+(\d+)", stats).group(1)) if "Queries lost" in stats else 0
        codes = dict(re.findall(r"([A-Z]+) (\d+) \(", stats.split("Response codes:", 1)[-1].split("\n", 1)[0]))
        self.tally.ok = int(codes.pop("NOERROR", 0))
        for code, count in codes.items():
            self.tally.failed += int(count)
            self.tally.reasons[f"dnsperf {code}"] += int(count)
        if lost:
            self.tally.failed += lost
            self.tally.reasons["dnsperf lost"] += lost
        if "Statistics:" not in self.output:
            self.tally.bad("dnsperf printed no statistics")
        return self.tally
