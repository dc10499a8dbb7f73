"""The forwarder against fake upstreams on 127.0.0.1: TC -> TCP, timeouts, failover, bad rcodes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from dnslib import DNSRecord

from sidecar.config import DnsSettings, HostPort
from sidecar.dns import forward
from sidecar.dns.forward import Forwarder, resolv_conf_upstreams
from sidecar.dns.server import upstreams_from
from sidecar.metrics import DnsMetrics, Metrics

from .conftest import FakeUpstream

MakeUpstream = Callable[[str], Coroutine[Any, Any, FakeUpstream]]


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[MakeUpstream]:
    started: list[FakeUpstream] = []

    async def make(mode: str = "answer") -> FakeUpstream:
        fake = await FakeUpstream(mode).start()
        started.append(fake)
        return fake

    yield make
    while _OPEN:
        _OPEN.pop().close()
    await asyncio.sleep(0)  # the sockets' connection_lost
    for fake in started:
        await fake.stop()


# Forwarders made by the tests, closed by the ``upstream`` fixture (which every test using them has).
_OPEN: list[Forwarder] = []


def message(name: str = "example.com", qid: int = 0x4242) -> bytes:
    record = DNSRecord.question(name, "A")
    record.header.id = qid
    return bytes(record.pack())


def forwarder(*fakes: FakeUpstream | tuple[str, int], timeout: float = 0.5) -> tuple[Forwarder, DnsMetrics]:
    metrics = Metrics().dns
    addresses = [f if isinstance(f, tuple) else ("127.0.0.1", f.port) for f in fakes]
    fwd = Forwarder(addresses, timeout, metrics)
    _OPEN.append(fwd)
    return fwd, metrics


@pytest.mark.asyncio
async def test_answer_keeps_the_client_id_and_question(upstream: MakeUpstream) -> None:
    fake = await upstream("answer")
    fwd, metrics = forwarder(fake)
    response = await fwd.forward(message("ExAmple.com", qid=0x0102))
    assert response is not None
    record = DNSRecord.parse(response)
    assert record.header.id == 0x0102 and str(record.q.qname) == "ExAmple.com."
    assert [str(rr.rdata) for rr in record.rr] == ["192.0.2.1"]
    assert metrics.forwarded["answered"] == 1 and fake.udp_queries == 1


@pytest.mark.asyncio
async def test_truncated_udp_is_retried_over_tcp(upstream: MakeUpstream) -> None:
    fake = await upstream("truncate")
    fwd, _ = forwarder(fake)
    response = await fwd.forward(message())
    assert response is not None
    record = DNSRecord.parse(response)
    assert record.header.tc == 0 and len(record.rr) == 40
    assert (fake.udp_queries, fake.tcp_queries) == (1, 1)


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", ["silent", "servfail", "refused"])
async def test_failover_to_the_next_upstream(upstream: MakeUpstream, bad: str) -> None:
    broken, good = await upstream(bad), await upstream("answer")
    fwd, metrics = forwarder(broken, good, timeout=0.3)
    response = await fwd.forward(message())
    assert response is not None and DNSRecord.parse(response).rr
    reason = {"silent": "timeout"}.get(bad, bad)
    assert metrics.upstream_errors[(broken.address, reason)] == 1
    # The upstream that answered is asked first from now on.
    await fwd.forward(message())
    assert broken.udp_queries == 1 and good.udp_queries == 2


@pytest.mark.asyncio
async def test_all_upstreams_failing_gives_none(upstream: MakeUpstream) -> None:
    fwd, metrics = forwarder(await upstream("silent"), await upstream("servfail"), timeout=0.2)
    assert await fwd.forward(message()) is None
    assert metrics.forwarded["failed"] == 1


@pytest.mark.asyncio
async def test_unreachable_upstream_is_a_network_error_or_timeout(upstream: MakeUpstream) -> None:
    good = await upstream("answer")
    # A closed port on loopback: ICMP port unreachable, surfaced as a connection error.
    closed = await upstream("answer")
    await closed.stop()
    fwd, metrics = forwarder(("127.0.0.1", closed.port), good, timeout=0.5)
    assert await fwd.forward(message()) is not None
    assert sum(metrics.upstream_errors.values()) == 1


@pytest.mark.asyncio
async def test_spoofed_ids_are_ignored(upstream: MakeUpstream) -> None:
    fake = await upstream("spoof")
    fwd, _ = forwarder(fake)
    response = await fwd.forward(message(qid=9))
    assert response is not None and DNSRecord.parse(response).header.id == 9


@pytest.mark.asyncio
async def test_udp_sockets_are_shared_and_replies_matched_by_id_and_question(upstream: MakeUpstream) -> None:
    fake = await upstream("answer")
    fwd, _ = forwarder(fake)
    names = [f"host{i}.Example.com" for i in range(40)]
    responses = await asyncio.gather(*(fwd.forward(message(name, qid=i)) for i, name in enumerate(names)))
    for i, (name, response) in enumerate(zip(names, responses, strict=True)):
        assert response is not None
        record = DNSRecord.parse(response)
        assert (record.header.id, str(record.q.qname)) == (i, f"{name}.")
    assert len(fake.udp_sources) <= forward.POOL_SIZE


@pytest.mark.asyncio
async def test_sockets_are_replaced_after_their_uses(upstream: MakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forward, "SOCKET_USES", 1)
    fake = await upstream("answer")
    fwd, _ = forwarder(fake)
    for i in range(3 * forward.POOL_SIZE):
        assert await fwd.forward(message(qid=i)) is not None
    # One socket per query, each closed with its reply (ports may come back, so count loosely).
    assert len(fake.udp_sources) > forward.POOL_SIZE
    assert all(s is None or s.transport is None or s.transport.is_closing() for p in fwd._sockets.values() for s in p)


@pytest.mark.asyncio
async def test_idle_sockets_too_old_are_closed_when_replaced(upstream: MakeUpstream,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    fake = await upstream("answer")
    fwd, _ = forwarder(fake)
    monkeypatch.setattr(forward, "POOL_SIZE", 1)
    assert await fwd.forward(message()) is not None
    (first,) = fwd._sockets[("127.0.0.1", fake.port)]
    monkeypatch.setattr(forward, "SOCKET_SECONDS", -1.0)
    assert await fwd.forward(message()) is not None
    assert first is not None and first.transport is not None and first.transport.is_closing()
    assert fwd._sockets[("127.0.0.1", fake.port)] != [first]


def test_upstream_addresses() -> None:
    def parse(text: str) -> tuple[str, int]:
        return tuple(HostPort.parse(text, "dns.upstreams", default_port=53))

    assert parse("10.0.0.1") == ("10.0.0.1", 53)
    assert parse("10.0.0.1:5353") == ("10.0.0.1", 5353)
    assert parse("[::1]:5353") == ("::1", 5353)
    assert parse("::1") == ("::1", 53)


def test_resolv_conf_excludes_our_own_listener(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# pod\nsearch svc.cluster.local\nnameserver 127.0.0.1\nnameserver 10.96.0.10\n"
                    "nameserver fe80::1%eth0\noptions ndots:5\n")
    assert resolv_conf_upstreams(("127.0.0.1", 53), str(conf)) == [("10.96.0.10", 53), ("fe80::1", 53)]
    assert resolv_conf_upstreams(("0.0.0.0", 53), str(conf)) == []
    assert resolv_conf_upstreams(("127.0.0.1", 15053), str(conf))[0] == ("127.0.0.1", 53)
    assert resolv_conf_upstreams(("127.0.0.1", 53), str(tmp_path / "missing")) == []


def test_upstreams_from_settings(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 10.96.0.10\n")
    assert upstreams_from(DnsSettings(upstreams=("none",)), ("127.0.0.1", 53), str(conf)) is None
    assert upstreams_from(DnsSettings(upstreams=("127.0.0.1:5300", "127.0.0.2")), ("127.0.0.1", 53)) == [
        ("127.0.0.1", 5300), ("127.0.0.2", 53)]
    assert upstreams_from(DnsSettings(), ("127.0.0.1", 53), str(conf)) == [("10.96.0.10", 53)]
