"""The chaos scenarios in CI mode (FAST): small loads, short TTLs, every answer checked."""

from __future__ import annotations

import dataclasses

import pytest

from ..etcd_cluster import EtcdCluster
from . import scenarios
from .isolation import MemoryCgroup, NetnsPair
from .partition import partition
from .rig import FAST

pytestmark = [pytest.mark.etcd, pytest.mark.chaos, pytest.mark.asyncio]


async def test_leader_sigkill_under_load_loses_nothing(cluster: EtcdCluster, prefix: str) -> None:
    outcome = await scenarios.leader_kill(cluster, prefix, FAST)
    print(outcome.summary())
    assert outcome.dns.failed == 0 and outcome.dns.ok > 0, outcome.summary()
    assert outcome.proxy.failed == 0 and outcome.proxy.ok > 0, outcome.summary()
    assert outcome.registry.failed == 0, outcome.summary()


async def test_quorum_loss_serves_the_last_snapshot_and_converges_after(cluster: EtcdCluster, prefix: str) -> None:
    outcome = await scenarios.quorum_loss(cluster, prefix, FAST)
    print(outcome.summary())
    assert outcome.dns.failed == 0 and outcome.dns.ok > 0, outcome.summary()
    assert outcome.proxy.failed == 0 and outcome.proxy.ok > 0, outcome.summary()
    assert outcome.figures["sidecars alive"], outcome.summary()
    # Registrations during the outage are kept pending (202), none refused, all written after it.
    assert outcome.figures["registrations refused during outage"] == 0, outcome.summary()
    assert outcome.figures["still pending at the end"] == [], outcome.summary()


async def test_compaction_while_events_flow_relists_without_stale_or_missing_agents(
        cluster: EtcdCluster, prefix: str) -> None:
    outcome = await scenarios.compaction(cluster, prefix, FAST)
    print(outcome.summary())
    assert outcome.figures["relists of the frozen sidecar"] >= 1, outcome.summary()
    assert outcome.dns.failed == 0 and outcome.proxy.failed == 0, outcome.summary()


async def test_hanging_and_resetting_agents_leave_clients_served(cluster: EtcdCluster, prefix: str) -> None:
    outcome = await scenarios.bad_agents(cluster, prefix, FAST)
    print(outcome.summary())
    assert outcome.dns.failed == 0, outcome.summary()
    assert outcome.proxy.ok / outcome.proxy.total >= 0.99, outcome.summary()


async def test_membership_changes_are_followed_without_a_restart(cluster: EtcdCluster, prefix: str) -> None:
    outcome = await scenarios.membership(cluster, prefix, FAST)
    print(outcome.summary())
    assert outcome.dns.failed == 0 and outcome.proxy.failed == 0, outcome.summary()
    assert outcome.registry.failed == 0, outcome.summary()


async def test_a_sidecar_in_128_mib_and_one_cpu_keeps_answering_without_growing(
        cluster: EtcdCluster, prefix: str) -> None:
    reason = MemoryCgroup.unavailable()
    if reason:
        pytest.skip(reason)
    outcome = await scenarios.resource_limits(cluster, prefix, FAST)
    print(outcome.summary())
    assert outcome.figures["alive"] and outcome.figures["oom kills"] == 0, outcome.summary()
    # One pinned CPU of a shared machine: a UDP query may be dropped while another process holds that CPU.
    assert outcome.dns.ok >= 0.99 * outcome.dns.total and outcome.proxy.failed == 0, outcome.summary()
    # Not a speed figure: a leak at this load would add megabytes a second.
    assert outcome.figures["RSS growth after warm-up MiB"] < 16, outcome.summary()


async def test_a_partitioned_sidecar_serves_stale_then_converges_after_heal(prefix: str) -> None:
    reason = NetnsPair.unavailable()
    if reason:
        pytest.skip(reason)
    outcome = await partition(prefix, FAST)
    print(outcome.summary())
    assert outcome.figures["stale view during the cut"] == [], outcome.summary()
    assert outcome.dns.failed == 0 and outcome.proxy.failed == 0, outcome.summary()
    assert outcome.figures["converged after heal s"] <= 5, outcome.summary()


async def test_a_frozen_member_costs_no_lease(cluster: EtcdCluster, prefix: str) -> None:
    # Leases of the default 10 s, frozen 6 s each: before the fix a stuck keepalive stream (gRPC notices
    # after ~8 s) outlived a refresh interval plus the rest of the TTL; after it, an attempt costs 0.5 s.
    # With 3 s leases the margin was one refresh against the scheduling of a loaded 2-core machine.
    outcome = await scenarios.frozen_member(cluster, prefix, dataclasses.replace(FAST, ttl="10s"), freeze=6.0)
    print(outcome.summary())
    # A keepalive stream left stuck on the frozen member lets the 3 s leases expire: the stable
    # agents drop out of the answers (before the fix: 86 failed of 5,416). Re-registrations are
    # printed, not asserted: on a machine loaded far beyond its 2 cores a refresh may miss its 0.5 s.
    assert outcome.dns.failed == 0 and outcome.proxy.failed == 0, outcome.summary()
    # Before attempts were steered per member, a registration now and then missed its 5 s deadline
    # (two of its three attempts sent to the frozen member by the round-robin channel).
    assert outcome.figures["refused registrations"] == [], outcome.summary()
