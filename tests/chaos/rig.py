"""A scenario's world: sidecar processes on one etcd cluster, healthy backends, stable agents, load.

``Scale`` is the one knob between the CI mode (tests/chaos, small loads, short
TTLs) and the long mode (bench/chaos/run.py, the issue's loads and durations).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .fleet import Backend, SidecarProcess, agent_body, agent_ids, register
from .load import Churn, DnsLoad, DnsperfLoad, ProxyLoad, Tally, process_udp_drops


@dataclass(frozen=True)
class Scale:
    dns_qps: int = 300           # over all sidecars
    proxy_rps: int = 30
    churn_per_second: float = 4.0
    settle: float = 4.0          # load kept on after a fault
    outage: float = 6.0          # quorum loss, partition
    ttl: str = "3s"              # leases of the test agents
    stable_agents: int = 3
    full_dns_qps: int = 1500     # the resource-limit scenario's load, on one sidecar
    full_proxy_rps: int = 100
    limited: float = 8.0         # how long it runs
    dnsperf_qps: int = 0         # besides dns_qps: rcode-checked queries from dnsperf, over all sidecars


FAST = Scale()
LONG = Scale(dns_qps=1000, dnsperf_qps=5000, proxy_rps=200, churn_per_second=10.0, settle=20.0, outage=60.0, ttl="5s",
             full_dns_qps=5000, full_proxy_rps=500, limited=60.0)


@dataclass
class Outcome:
    """What one scenario saw: the tallies of every load and named figures."""

    name: str
    dns: Tally = field(default_factory=Tally)
    proxy: Tally = field(default_factory=Tally)
    registry: Tally = field(default_factory=Tally)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def served(self) -> Tally:
        """DNS answers and proxy requests together: the availability the issue asks about."""
        return self.dns.merge(self.proxy)

    def summary(self) -> str:
        lines = [f"{self.name}: availability {self.served}",
                 f"  dns {self.dns}", f"  proxy {self.proxy}", f"  registry {self.registry}"]
        lines += [f"  {key}: {value}" for key, value in self.figures.items()]
        return "\n".join(lines)


class Rig:
    """``count`` sidecars on ``endpoints``; stable agents (owned by the first) behind healthy backends."""

    def __init__(self, endpoints: Sequence[str], prefix: str, scale: Scale, count: int = 2,
                 wrap: Sequence[str] = (), **sections: dict[str, Any]) -> None:
        self.scale = scale
        self.prefix = prefix
        self.sidecars = [SidecarProcess(endpoints, prefix, wrap=wrap, **sections) for _ in range(count)]
        self.backends: list[Backend] = []
        self.stable: set[str] = set()
        self.http: aiohttp.ClientSession | None = None
        self._stop = asyncio.Event()
        self._loads: list[tuple[str, asyncio.Task[Tally]]] = []
        self._perfs: list[DnsperfLoad] = []
        self._clients: list[DnsLoad] = []
        self.churn: Churn | None = None

    async def __aenter__(self) -> Rig:
        self.http = aiohttp.ClientSession()
        for sidecar in self.sidecars:
            sidecar.start()
        await asyncio.gather(*(asyncio.to_thread(s.wait_ready) for s in self.sidecars))
        self.backends = [await Backend().start() for _ in range(self.scale.stable_agents)]
        for i, backend in enumerate(self.backends):
            await self.must_register(agent_body(f"stable-{i}", "stable", backend.port, self.scale.ttl))
            self.stable.add(f"stable-{i}")
        for sidecar in self.sidecars:
            await self.converged(sidecar, "stable", self.stable, timeout=20)
        return self

    async def must_register(self, body: dict[str, Any], sidecar: SidecarProcess | None = None) -> None:
        assert self.http is not None
        status, text = await register(self.http, (sidecar or self.sidecars[0]).admin, body)
        assert status == 201, (status, text)

    async def ids(self, sidecar: SidecarProcess, capability: str) -> set[str]:
        assert self.http is not None
        return await agent_ids(self.http, sidecar.admin, capability)

    async def converged(self, sidecar: SidecarProcess, capability: str, expected: set[str],
                        timeout: float = 5.0) -> float:
        """Seconds until ``sidecar`` lists exactly ``expected`` for ``capability``; fails after ``timeout``."""
        started = time.monotonic()
        seen: set[str] | str = set()
        while True:
            try:
                seen = await self.ids(sidecar, capability)
                if seen == expected:
                    return time.monotonic() - started
            except (TimeoutError, aiohttp.ClientError) as exc:
                seen = repr(exc)
            if time.monotonic() - started > timeout:
                missing = expected - seen if isinstance(seen, set) else expected
                extra = seen - expected if isinstance(seen, set) else seen
                raise AssertionError(f"{capability} on :{sidecar.admin_port} not converged after {timeout:g}s: "
                                     f"missing {sorted(missing)}, extra {extra}")
            await asyncio.sleep(0.02)

    def start_load(self, proxy_capability: str = "stable", churn: bool = True, full: bool = False) -> None:
        """DNS on every sidecar, proxy requests through the last one, churn through the first."""
        self._stop.clear()
        loop = asyncio.get_running_loop()
        # With dnsperf (long mode) it sends the bulk and the Python checker stays at dns_qps.
        perf_qps = 0
        if self.scale.dnsperf_qps and shutil.which("dnsperf"):
            perf_qps = self.scale.full_dns_qps if full else self.scale.dnsperf_qps
        dns_qps = self.scale.full_dns_qps if full and not perf_qps else self.scale.dns_qps
        share = max(1, dns_qps // len(self.sidecars))
        for sidecar in self.sidecars:
            dns = DnsLoad(sidecar.host, sidecar.dns_port, "stable.agents.local", len(self.stable), share)
            self._loads.append(("dns", loop.create_task(dns.run(self._stop))))
            self._clients.append(dns)
            if perf_qps:
                perf = DnsperfLoad(sidecar.host, sidecar.dns_port, "stable.agents.local",
                                   max(1, perf_qps // len(self.sidecars)), tempfile.gettempdir())
                self._loads.append(("dns", loop.create_task(perf.run(self._stop))))
                self._perfs.append(perf)
        last = self.sidecars[-1]
        proxy = ProxyLoad(last.host, last.proxy_port, proxy_capability,
                          self.scale.full_proxy_rps if full else self.scale.proxy_rps)
        self._loads.append(("proxy", loop.create_task(proxy.run(self._stop))))
        if churn:
            self.churn = self.churn or Churn(self.sidecars[0].admin, "churn", self.backends[0].port,
                               self.scale.churn_per_second, self.scale.ttl)
            self._loads.append(("registry", loop.create_task(self.churn.run(self._stop))))

    async def stop_load(self, outcome: Outcome) -> Outcome:
        self._stop.set()
        for kind, task in self._loads:
            tally = await task
            setattr(outcome, kind, getattr(outcome, kind).merge(tally))
        self._loads.clear()
        alive = [s for s in self.sidecars if s.alive()]
        counted = sum(s.metric("sidecar_dns_queries_total") for s in alive)
        outcome.figures["DNS queries the sidecars counted (cumulative)"] = int(counted)
        # The sidecars' own count, and the kernel's per-socket counters of their UDP sockets, read from outside.
        outcome.figures["UDP receive drops by the kernel (cumulative)"] = \
            int(sum(s.metric("sidecar_dns_udp_receive_drops_total") for s in alive))
        outcome.figures["drops at the sidecars' UDP sockets, /proc (cumulative)"] = \
            sum(process_udp_drops(s.process.pid) for s in alive if s.process is not None)
        # Replies lost at the client: dropped by the kernel at dnsperf's sockets (not the sidecar's).
        for key, drops in (("replies dropped at dnsperf's sockets", sum(p.socket_drops for p in self._perfs)),
                           ("replies dropped at the checker's sockets", sum(c.socket_drops for c in self._clients))):
            outcome.figures[key] = outcome.figures.get(key, 0) + drops
        self._perfs.clear()
        self._clients.clear()
        # Per sidecar: event-loop probes more than 0.1 s late, and the range of the worst one.
        outcome.figures["event loop lags > 0.1 s, worst (cumulative)"] = [s.loop_lags() for s in alive]
        return outcome

    async def check_churn(self, outcome: Outcome, timeout: float = 5.0) -> None:
        """No lost and no resurrected registration: every sidecar lists exactly what churn expects."""
        assert self.churn is not None
        waits = [await self.converged(s, "churn", self.churn.expected, timeout) for s in self.sidecars]
        outcome.figures["churn agents checked"] = len(self.churn.expected)
        if self.churn.pending:
            outcome.figures["churn calls without success"] = sorted(self.churn.pending.items())[:5]
        outcome.figures["churn convergence s"] = round(max(waits), 3)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        for _, task in self._loads:
            task.cancel()
        for sidecar in self.sidecars:
            await asyncio.to_thread(sidecar.stop)
        for backend in self.backends:
            await backend.close()
        if self.http is not None:
            await self.http.close()
