"""docs/metrics.md as data: the documented families, and the families a registry or a /metrics page exports.

A family is keyed by the name PromQL uses for it: a counter with its ``_total``,
a histogram or gauge by its base name.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
from prometheus_client import Metric

from sidecar.server import Server

from .etcd_process import free_port
from .health.conftest import HttpAgent
from .waiting import eventually

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"

_ENTRY = re.compile(r"- `(?P<name>sidecar_[a-z0-9_]+)` "
                    r"\((?P<type>counter|gauge|histogram)(?:; (?P<labels>[a-z_, ]+))?\): \S")
# Series a histogram adds to its family name.
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


@dataclass(frozen=True)
class Family:
    type: str
    labels: frozenset[str] | None  # None: no sample was seen, so the labels are not known


def documented(text: str | None = None) -> dict[str, Family]:
    """Every ``- `sidecar_...` (type; labels): ...`` line of docs/metrics.md; a malformed one raises."""
    families: dict[str, Family] = {}
    for number, line in enumerate((DOC.read_text() if text is None else text).splitlines(), 1):
        if not line.startswith("- `sidecar_"):
            continue
        match = _ENTRY.match(line)
        if match is None:
            raise ValueError(f"docs/metrics.md line {number} is not '- `name` (type[; labels]): text': {line}")
        name = match["name"]
        if name in families:
            raise ValueError(f"docs/metrics.md line {number}: {name} is listed twice")
        labels = frozenset(label.strip() for label in (match["labels"] or "").split(",") if label.strip())
        families[name] = Family(match["type"], labels)
    return families


def promql_name(name: str, kind: str) -> str:
    """The name a collected family is queried by: counters end in ``_total``."""
    return name if kind != "counter" or name.endswith("_total") else f"{name}_total"


def exported(metrics: Iterable[Metric]) -> dict[str, Family]:
    """Families as collected or parsed, with the label names their samples carry (``le`` aside).

    The text format shows a counter's or histogram's ``_created`` series as a gauge family
    of its own; those are folded into the family they belong to.
    """
    collected = list(metrics)
    families: dict[str, Family] = {}
    owners = {m.name for m in collected if m.type in ("counter", "histogram")}
    for metric in collected:
        if metric.type == "gauge" and metric.name.endswith("_created") and metric.name[:-8] in owners:
            continue
        labels: set[str] = set()
        for sample in metric.samples:
            if not sample.name.endswith("_created"):
                labels |= set(sample.labels) - {"le"}
        seen = any(not sample.name.endswith("_created") for sample in metric.samples)
        families[promql_name(metric.name, metric.type)] = Family(metric.type, frozenset(labels) if seen else None)
    return families


def differences(documented: dict[str, Family], exported: dict[str, Family]) -> list[str]:
    """One line per disagreement between the doc and what is exported; empty when they agree."""
    problems = [f"{name} is exported but not in docs/metrics.md" for name in sorted(exported.keys() - documented)]
    problems += [f"{name} is in docs/metrics.md but not exported" for name in sorted(documented.keys() - exported)]
    for name in sorted(documented.keys() & exported.keys()):
        doc, real = documented[name], exported[name]
        if doc.type != real.type:
            problems.append(f"{name} is a {real.type}, docs/metrics.md says {doc.type}")
        if real.labels is not None and real.labels != doc.labels:
            problems.append(f"{name} has labels {sorted(real.labels)}, docs/metrics.md says {sorted(doc.labels or ())}")
    return problems


def series(families: dict[str, Family]) -> set[str]:
    """Every series name PromQL can select from these families (for a histogram: _bucket, _sum, _count)."""
    names = set()
    for name, family in families.items():
        names |= {name + suffix for suffix in HISTOGRAM_SERIES} if family.type == "histogram" else {name}
    return names


@contextlib.asynccontextmanager
async def busy_sidecar(make_server: Callable[..., object]) -> AsyncIterator[Server]:
    """A running sidecar that has served DNS (in-zone, forwarded to a dead upstream, malformed, a stray response),
    proxied requests to its healthy local agent and to a dead one (whose breaker opens), and active health
    checks: most families have samples."""
    backend = await HttpAgent().start()
    port = backend.port
    try:
        server = await make_server(  # type: ignore[operator]
            dns={"listen": "127.0.0.1:0", "upstreams": [f"127.0.0.1:{free_port()}"], "upstream_timeout": 0.2},
            agent={"name": "echo", "address": "127.0.0.1", "port": port, "capabilities": ["echo"],
                   "health": {"type": "http", "url": f"http://127.0.0.1:{port}/health"}},
            health_check={"interval": 0.1, "success_threshold": 1})
        assert isinstance(server, Server)
        await eventually(lambda: server.readiness()["ready"], what="sidecar ready")
        await eventually(lambda: any(a.health.status == "healthy" for a in server.catalog.snapshot.agents.values()),
                         what="local agent healthy in the snapshot")
        assert server.dns.address is not None and server.proxy.address is not None
        dns_host, dns_port = server.dns.address[:2]
        for _ in range(2 * 64):  # the DNS latency histogram times one query in 64
            answer = await dns.asyncquery.udp(dns.message.make_query("echo.agents.local", "A"), dns_host,
                                              port=dns_port, timeout=5)
            assert answer.rcode() == dns.rcode.NOERROR and answer.answer
        forwarded = await dns.asyncquery.udp(dns.message.make_query("example.com", "A"), dns_host, port=dns_port,
                                             timeout=10)
        assert forwarded.rcode() == dns.rcode.SERVFAIL
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.sendto(struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0), (dns_host, dns_port))  # a question missing
            raw.sendto(struct.pack("!HHHHHH", 2, 0x8000, 0, 0, 0, 0), (dns_host, dns_port))  # a response
        proxy_host, proxy_port = server.proxy.address
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.get(f"http://{proxy_host}:{proxy_port}/health",
                                    headers={"Host": "echo.agents.local"}) as response:
                    assert response.status == 200, await response.text()
            # An A2A call naming a task nobody is known to hold: counted as a miss, relayed as usual.
            async with http.post(f"http://{proxy_host}:{proxy_port}/health", headers={"Host": "echo.agents.local"},
                                 json={"jsonrpc": "2.0", "id": 1, "method": "tasks/get", "params": {"id": "t"}}):
                pass
            # An agent nobody listens for: its requests fail until its breaker opens (the breaker gauges).
            await server.control.register({"id": "dead-1", "name": "dead", "address": "127.0.0.1",
                                           "port": free_port(), "capabilities": ["dead"], "ttl": "30s"})
            await eventually(lambda: "dead-1" in server.catalog.snapshot.by_id, what="the dead agent in the snapshot")
            for _ in range(20):
                if server.proxy.breaker_state("dead-1") == "open":
                    break
                async with http.get(f"http://{proxy_host}:{proxy_port}/", headers={"Host": "dead.agents.local"}):
                    pass
            assert server.proxy.breaker_state("dead-1") == "open"
        yield server
    finally:
        await backend.stop()
