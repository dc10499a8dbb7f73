"""Registration, keepalive, expiry, re-registration and the watched snapshot, on a real etcd."""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.catalog import Catalog
from sidecar.discovery import Kind
from sidecar.errors import LeaseNotFound, RegistryUnavailable
from sidecar.metrics import Metrics
from sidecar.model import parse_agent
from sidecar.registry.api import Registry
from sidecar.registry.etcd import EtcdClient
from sidecar.registry.lease import LeaseKeeper
from sidecar.registry.sync import CatalogSync

from ..etcd_process import EtcdProcess
from ..test_model import GO_JSON
from ..waiting import eventually

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]


def agent(agent_id: str = "a1", caps: tuple[str, ...] = ("chat",), ttl: str = "3s", **extra: object):
    return parse_agent({"id": agent_id, "name": "svc", "address": "127.0.0.1", "port": 8080,
                        "capabilities": list(caps), "ttl": ttl, **extra})


class Sidecar:
    """A catalog kept in sync with etcd, as a second sidecar process would hold it."""

    def __init__(self, endpoint: str, prefix: str) -> None:
        self.metrics = Metrics()
        self.etcd = EtcdClient([endpoint], timeout=2)
        self.catalog = Catalog()
        self.sync = CatalogSync(self.etcd, prefix, self.catalog, self.metrics.registry)

    async def __aenter__(self) -> Sidecar:
        await self.sync.start()
        await asyncio.wait_for(self.sync.synced.wait(), 20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sync.stop()
        await self.etcd.close()

    def ids(self, capability: str = "chat") -> list[str]:
        return [a.id for a in self.catalog.snapshot.by_capability.get(capability, ())]


async def test_register_appears_keepalive_holds_and_close_removes(etcd: EtcdProcess, prefix: str) -> None:
    async with Registry([etcd.endpoint], prefix=prefix) as registry, Sidecar(etcd.endpoint, prefix) as peer:
        registration = await registry.register(agent(ttl="2s"))
        await eventually(lambda: peer.ids() == ["a1"], what="registration to propagate")
        # Three TTLs later the keepalive has kept it.
        await asyncio.sleep(6)
        assert peer.ids() == ["a1"]
        stored = json.loads(etcd.ctl("get", "--print-value-only", f"{prefix}/services/svc/a1"))
        assert stored["register_time"] and stored["ttl"] == 2_000_000_000
        await registration.close()
        await eventually(lambda: peer.ids() == [], what="deregistration to propagate")
        assert (await registry.discover("chat")) == ()


async def test_lease_expires_when_keepalive_stops(etcd: EtcdProcess, prefix: str) -> None:
    client = EtcdClient([etcd.endpoint], timeout=2)
    try:
        async with Sidecar(etcd.endpoint, prefix) as peer:
            lease = await client.grant(2)
            await client.put(f"{prefix}/services/svc/a1", agent().to_bytes(), lease)
            await eventually(lambda: peer.ids() == ["a1"])
            await eventually(lambda: peer.ids() == [], what="lease expiry")
            with pytest.raises(LeaseNotFound):
                await client.refresh(lease)
    finally:
        await client.close()


async def test_reregisters_after_its_lease_is_revoked_elsewhere(etcd: EtcdProcess, prefix: str) -> None:
    metrics = Metrics()
    client = EtcdClient([etcd.endpoint], timeout=2)
    keeper = LeaseKeeper(client, prefix, metrics.registry, refresh_interval=0.3)
    try:
        async with Sidecar(etcd.endpoint, prefix) as peer:
            registration = await keeper.register(agent())
            await eventually(lambda: peer.ids() == ["a1"])
            old_lease = registration.lease_id
            etcd.ctl("lease", "revoke", f"{old_lease:x}")
            await eventually(lambda: registration.lease_id != old_lease, what="a new lease")
            await eventually(lambda: peer.ids() == ["a1"], what="the agent to come back")
            assert metrics.registry.reregistrations._value.get() >= 1
    finally:
        await keeper.close()
        await client.close()


async def test_update_keeps_the_lease(etcd: EtcdProcess, prefix: str) -> None:
    async with Registry([etcd.endpoint], prefix=prefix) as registry, Sidecar(etcd.endpoint, prefix) as peer:
        registration = await registry.register(agent())
        await registration.update(registration.agent.with_status("unhealthy"))
        await eventually(lambda: peer.catalog.snapshot.by_id.get("a1", (None,))[0] is not None
                         and not peer.catalog.snapshot.by_id["a1"][0].healthy)
        leases = etcd.ctl("get", f"{prefix}/services/svc/a1", "-w", "json")
        assert json.loads(leases)["kvs"][0]["lease"] == registration.lease_id


async def test_malformed_and_go_values_in_etcd(etcd: EtcdProcess, prefix: str) -> None:
    etcd.ctl("put", f"{prefix}/services/go/summarizer-1", GO_JSON.decode())
    etcd.ctl("put", f"{prefix}/services/bad/x", "{not json")
    etcd.ctl("put", f"{prefix}/services/bad/y", '{"id": "y", "name": "bad", "port": "eighty"}')
    async with Sidecar(etcd.endpoint, prefix) as peer:
        assert peer.ids("summarize") == ["summarizer-1"]
        assert len(peer.catalog.snapshot.agents) == 1
        assert peer.metrics.registry.invalid_values._value.get() == 2
        # A valid agent later overwritten by garbage disappears instead of being served stale.
        etcd.ctl("put", f"{prefix}/services/go/summarizer-1", "garbage")
        await eventually(lambda: peer.ids("summarize") == [])
        assert peer.metrics.registry.invalid_values._value.get() == 3


async def test_watch_resumes_after_etcd_restart(private_etcd: EtcdProcess, prefix: str) -> None:
    async with Sidecar(private_etcd.endpoint, prefix) as peer:
        private_etcd.ctl("put", f"{prefix}/services/svc/a1", agent().to_bytes().decode())
        await eventually(lambda: peer.ids() == ["a1"])
        private_etcd.stop()
        await eventually(lambda: not peer.sync.connected, what="the watch to notice the outage")
        assert peer.ids() == ["a1"], "the last snapshot keeps serving while etcd is down"
        assert peer.sync.stale_seconds() >= 0 and peer.sync.stale_since is not None
        private_etcd.start()
        private_etcd.ctl("put", f"{prefix}/services/svc/a2", agent("a2").to_bytes().decode())
        await eventually(lambda: peer.ids() == ["a1", "a2"], timeout=30, what="the watch to resume")
        assert peer.sync.connected and peer.sync.stale_since is None
        assert peer.metrics.registry.relists._value.get() == 1, "resumed from the revision, no relist"


async def test_relists_after_compaction(private_etcd: EtcdProcess, prefix: str) -> None:
    async with Sidecar(private_etcd.endpoint, prefix) as peer:
        private_etcd.ctl("put", f"{prefix}/services/svc/a1", agent().to_bytes().decode())
        await eventually(lambda: peer.ids() == ["a1"])
        private_etcd.stop()
        await eventually(lambda: not peer.sync.connected)
        private_etcd.start()
        # While this sidecar is away: changes, then a compaction past its revision.
        private_etcd.ctl("del", f"{prefix}/services/svc/a1")
        private_etcd.ctl("put", f"{prefix}/services/svc/a3", agent("a3").to_bytes().decode())
        revision = json.loads(private_etcd.ctl("get", "x", "-w", "json"))["header"]["revision"]
        private_etcd.ctl("compact", str(revision))
        await eventually(lambda: peer.ids() == ["a3"], timeout=30, what="a relist")
        assert peer.metrics.registry.relists._value.get() >= 2


async def test_agent_comes_back_after_an_outage_longer_than_its_ttl(private_etcd: EtcdProcess,
                                                                    prefix: str) -> None:
    metrics = Metrics()
    client = EtcdClient([private_etcd.endpoint], timeout=1)
    keeper = LeaseKeeper(client, prefix, metrics.registry, refresh_interval=0.5)
    try:
        await keeper.register(agent(ttl="2s"))
        private_etcd.pause()  # frozen, as a partitioned member is
        await asyncio.sleep(3)
        private_etcd.resume()
        # etcd expires the lease on its own clock once it runs again; the keeper must re-register.
        async with Sidecar(private_etcd.endpoint, prefix) as peer:
            await eventually(lambda: metrics.registry.reregistrations._value.get() >= 1, timeout=30,
                             what="a re-registration")
            await eventually(lambda: peer.ids() == ["a1"], timeout=30)
    finally:
        await keeper.close()
        await client.close()


async def test_calls_fail_fast_when_etcd_is_down(private_etcd: EtcdProcess) -> None:
    private_etcd.stop()
    client = EtcdClient([private_etcd.endpoint], timeout=1)
    try:
        with pytest.raises(RegistryUnavailable):
            await client.grant(5)
    finally:
        await client.close()


async def test_thousand_concurrent_registrations(etcd: EtcdProcess, prefix: str) -> None:
    async with Registry([etcd.endpoint], prefix=prefix) as registry, Sidecar(etcd.endpoint, prefix) as peer:
        registrations = await asyncio.gather(*(
            registry.register(agent(f"a{i}", caps=("bulk",), ttl="10s")) for i in range(1000)))
        assert len({r.lease_id for r in registrations}) == 1000
        await eventually(lambda: len(peer.ids("bulk")) == 1000)
        await registry.leases.close()
        await eventually(lambda: peer.ids("bulk") == [])


async def test_python_api_discover_and_watch(etcd: EtcdProcess, prefix: str) -> None:
    async with Registry([etcd.endpoint], prefix=prefix) as registry:
        changes = registry.watch("code")
        first = await asyncio.wait_for(anext(changes), 20)
        assert first.kind is Kind.SNAPSHOT and first.agents == ()
        handle = await registry.register(name="coder", address="127.0.0.1", port=9000, capabilities=["Code"],
                                         tags=["py"], ttl="5s")
        update = await asyncio.wait_for(anext(changes), 20)
        assert update.kind is Kind.UPSERT and [a.id for _, a in update.agents] == [handle.agent.id]
        assert [a.id for a in await registry.discover("code", tags=["PY"])] == [handle.agent.id]
        assert await registry.discover("code", tags=["go"]) == ()
        assert [a.name for a in await registry.discover(name="coder")] == ["coder"]
        await handle.close()
        update = await asyncio.wait_for(anext(changes), 20)
        assert update.kind is Kind.DELETE and update.agents[0][0] == handle.key
        resumed = registry.watch("code", from_revision=first.revision)
        replayed = [await asyncio.wait_for(anext(resumed), 20) for _ in range(2)]
        assert [u.kind for u in replayed] == [Kind.UPSERT, Kind.DELETE], "the changes after that revision, again"
        await resumed.aclose()
        await changes.aclose()


async def test_a_frozen_etcd_is_noticed_and_the_watch_resumes(private_etcd: EtcdProcess, prefix: str) -> None:
    """SIGSTOP, as a partition looks from here: gRPC keepalive must break the silent watch."""
    async with Sidecar(private_etcd.endpoint, prefix) as peer:
        private_etcd.ctl("put", f"{prefix}/services/svc/a1", agent().to_bytes().decode())
        await eventually(lambda: peer.ids() == ["a1"])
        private_etcd.pause()
        try:
            await eventually(lambda: not peer.sync.connected, timeout=40, what="the frozen watch to fail")
            assert peer.ids() == ["a1"]
        finally:
            private_etcd.resume()
        private_etcd.ctl("put", f"{prefix}/services/svc/a2", agent("a2").to_bytes().decode())
        await eventually(lambda: peer.ids() == ["a1", "a2"], timeout=40, what="the watch to resume")
