"""The etcd chaos scenarios, shared by the CI tests (FAST) and bench/chaos/run.py (LONG).

Each takes a running 3-member cluster, a key prefix and a Scale, keeps load on
while it breaks something, and returns an Outcome. Convergence and "no lost
registration" are checked inside (an AssertionError says what differed); the
callers judge the tallies.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from typing import Any

import dns.asyncquery
import dns.exception
import dns.message

from ..etcd_cluster import EtcdCluster, Member
from .fleet import Backend, SidecarProcess, agent_body, register
from .isolation import MemoryCgroup, rss
from .rig import Outcome, Rig, Scale


async def leader_kill(cluster: EtcdCluster, prefix: str, scale: Scale) -> Outcome:
    """SIGKILL the leader under load and leave it dead."""
    outcome = Outcome("leader SIGKILL")
    async with Rig(cluster.endpoints, prefix, scale) as rig:
        rig.start_load()
        await asyncio.sleep(scale.settle / 2)
        leader = cluster.wait_for_leader()
        killed = time.monotonic()
        leader.kill()
        await asyncio.to_thread(cluster.wait_for_leader)
        outcome.figures["new leader after s"] = round(time.monotonic() - killed, 2)
        await asyncio.sleep(scale.settle)
        await rig.stop_load(outcome)
        outcome.figures["first DNS failures, s after the kill"] = \
            [round(at - killed, 2) for at, _ in outcome.dns.first_failures[:5]]
        await rig.check_churn(outcome)
        for sidecar in rig.sidecars:
            await rig.converged(sidecar, "stable", rig.stable)
        assert rig.churn is not None
        outcome.figures["registration p100 s"] = round(max(rig.churn.latencies), 3)
    return outcome


async def quorum_loss(cluster: EtcdCluster, prefix: str, scale: Scale) -> Outcome:
    """Two of three members down for ``scale.outage``; a sidecar with a local agent starts during it;
    a registration posted during it is kept pending (202) and written once a leader is back."""
    outcome = Outcome("quorum loss")
    async with Rig(cluster.endpoints, prefix, scale) as rig:
        assert rig.http is not None
        rig.start_load()
        await asyncio.sleep(scale.settle / 2)
        leader = cluster.wait_for_leader()
        down = [leader, *[m for m in cluster.members if m is not leader][:1]]
        for member in down:
            member.kill()
        lost = time.monotonic()
        late_backend = await Backend().start()
        rig.backends.append(late_backend)
        # Answered (after the request timeout) before the members come back: the restart waits for it.
        held = asyncio.get_running_loop().create_task(
            register(rig.http, rig.sidecars[0].admin, agent_body("held-1", "held", late_backend.port, scale.ttl)))
        late = SidecarProcess(cluster.endpoints, prefix,
                              agent={"name": "late", "id": "late-1", "address": "127.0.0.1",
                                     "port": late_backend.port, "capabilities": ["late"], "ttl": "3s"})
        late.start()
        rig.sidecars.append(late)
        await asyncio.sleep(max(0.0, scale.outage - (time.monotonic() - lost)))
        held_status, held_text = await held
        outcome.figures["registration during the outage"] = f"{held_status} {held_text[:80]}"
        assert held_status == 202 and json.loads(held_text)["state"] == "pending", (held_status, held_text)
        pending = await _json(rig, rig.sidecars[0], "/v1/agents?capability=held")
        assert [a["id"] for a in pending["pending"]] == ["held-1"] and pending["agents"] == [], pending
        outcome.figures["late sidecar alive at end of outage"] = late.alive()
        for member in down:
            member.start(cluster.initial_cluster(), state="existing")
        await asyncio.to_thread(cluster.wait_for_leader)
        back = time.monotonic()
        outcome.figures["outage s"] = round(back - lost, 1)
        # The pending registration completes by itself: listed, and answered by DNS, on every sidecar.
        for sidecar in rig.sidecars[:2]:
            await rig.converged(sidecar, "held", {"held-1"}, timeout=5)
            await _dns_until(sidecar, "held.agents.local", 1, timeout=5 - (time.monotonic() - back))
        outcome.figures["pending registration served everywhere after recovery s"] = round(time.monotonic() - back, 2)
        status, _text = await register(rig.http, rig.sidecars[0].admin,
                                      agent_body("after-1", "after", late_backend.port, scale.ttl))
        outcome.figures["first registration after recovery"] = f"{status} after {time.monotonic() - back:.2f}s"
        for sidecar in rig.sidecars[:2]:
            await rig.converged(sidecar, "after", {"after-1"}, timeout=5)
        outcome.figures["all converged after recovery s"] = round(time.monotonic() - back, 2)
        await asyncio.to_thread(late.wait_ready, 30)
        for sidecar in rig.sidecars:
            await rig.converged(sidecar, "late", {"late-1"}, timeout=10)
        outcome.figures["late local agent registered after recovery s"] = round(time.monotonic() - back, 2)
        await asyncio.sleep(scale.settle / 2)
        await rig.stop_load(outcome)
        assert rig.churn is not None
        # Churn registrations during the outage are answered 202 and must be registered afterwards
        # (check_churn: every agent that got a 201 or a 202 is listed, and nothing else).
        outcome.figures["churn registrations kept pending"] = len(rig.churn.accepted)
        outcome.figures["registrations refused during outage"] = len(rig.churn.pending)
        outcome.figures["refusal statuses"] = sorted({status for status, _ in rig.churn.pending.values()})
        await rig.check_churn(outcome)
        left = await _json(rig, rig.sidecars[0], "/v1/agents")
        outcome.figures["still pending at the end"] = [a["id"] for a in left["pending"]]
        outcome.figures["sidecars alive"] = all(s.alive() for s in rig.sidecars)
    return outcome


async def _json(rig: Rig, sidecar: SidecarProcess, path: str) -> Any:
    assert rig.http is not None
    async with rig.http.get(sidecar.admin + path) as response:
        return json.loads(await response.text())


async def _dns_until(sidecar: SidecarProcess, name: str, answers: int, timeout: float) -> None:
    """Until the sidecar's DNS answers ``name`` with ``answers`` A records; fails after ``timeout``."""
    deadline = time.monotonic() + max(timeout, 0.1)
    got: object = None
    while time.monotonic() < deadline:
        try:
            response = await dns.asyncquery.udp(dns.message.make_query(name, "A"), sidecar.host,
                                                port=sidecar.dns_port, timeout=1)
            got = sum(len(rrset) for rrset in response.answer)
            if got == answers:
                return
        except (TimeoutError, dns.exception.DNSException) as exc:
            got = repr(exc)
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} on :{sidecar.dns_port}: {got}, not {answers} answers, within {timeout:.2f}s")


async def compaction(cluster: EtcdCluster, prefix: str, scale: Scale, rounds: int = 3) -> Outcome:
    """Compact + defrag while events flow; one sidecar, frozen meanwhile, must relist on resume."""
    outcome = Outcome("compaction")
    async with Rig(cluster.endpoints, prefix, scale) as rig:
        rig.start_load(churn=True)
        frozen = rig.sidecars[1]
        assert frozen.process is not None
        relists_before = _metric(frozen, "sidecar_registry_relists_total")
        for _ in range(rounds):
            await asyncio.sleep(scale.settle / rounds)
            revision = _revision(cluster)
            await asyncio.to_thread(cluster.ctl, "compact", str(revision))
            await asyncio.to_thread(cluster.ctl, "defrag")
        # The frozen sidecar's watch breaks while events it has not seen are compacted away.
        await rig.stop_load(outcome)
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            assert rig.churn is not None and rig.http is not None
            for _ in range(6):
                await rig.churn.step(rig.http)
            await asyncio.to_thread(cluster.ctl, "compact", str(_revision(cluster)))
            await asyncio.to_thread(cluster.ctl, "defrag")
            for member in cluster.members:
                member.kill()
            for member in cluster.members:
                member.start(cluster.initial_cluster(), state="existing")
            await asyncio.to_thread(cluster.wait_for_leader)
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        await rig.check_churn(outcome, timeout=15)
        outcome.figures["frozen sidecar converged after resume s"] = round(time.monotonic() - resumed, 2)
        outcome.figures["relists of the frozen sidecar"] = _metric(frozen, "sidecar_registry_relists_total") \
            - relists_before
        rig.start_load(churn=True)
        await asyncio.sleep(scale.settle / 2)
        await rig.stop_load(outcome)
        await rig.check_churn(outcome)
    return outcome


async def bad_agents(cluster: EtcdCluster, prefix: str, scale: Scale) -> Outcome:
    """A capability with one healthy, one hanging and one resetting agent, proxied to under load."""
    outcome = Outcome("hanging and resetting agents")
    async with Rig(cluster.endpoints, prefix, scale, count=1,
                   proxy={"read_timeout": 1.0, "connect_timeout": 1.0}) as rig:
        good, hung, reset = Backend(), Backend("hang"), Backend("reset")
        for i, backend in enumerate((good, hung, reset)):
            await backend.start()
            rig.backends.append(backend)
            await rig.must_register(agent_body(f"mixed-{i}", "mixed", backend.port, scale.ttl))
        await rig.converged(rig.sidecars[0], "mixed", {"mixed-0", "mixed-1", "mixed-2"})
        rig.start_load(proxy_capability="mixed", churn=False)
        await asyncio.sleep(scale.settle * 2)
        await rig.stop_load(outcome)
        outcome.figures["served by the healthy agent"] = good.served
        outcome.figures["breakers"] = await _breakers(rig, "mixed")
    return outcome


async def _breakers(rig: Rig, capability: str) -> dict[str, str]:
    assert rig.http is not None
    async with rig.http.get(rig.sidecars[0].admin + "/v1/agents", params={"capability": capability}) as response:
        document = json.loads(await response.text())
    return {agent["id"]: agent.get("breaker", "?") for agent in document["agents"]}


def _revision(cluster: EtcdCluster) -> int:
    status = json.loads(cluster.ctl("endpoint", "status", "-w", "json"))
    return max(int(s["Status"]["header"]["revision"]) for s in status)


def _metric(sidecar: SidecarProcess, name: str) -> float:
    return sidecar.metric(name)


async def membership(cluster: EtcdCluster, prefix: str, scale: Scale) -> Outcome:
    """Replace every original member (add one, remove one) under sidecars that know only the originals."""
    outcome = Outcome("membership changes")
    originals = list(cluster.members)
    async with Rig([m.endpoint for m in originals], prefix, scale) as rig:
        rig.start_load()
        assert rig.http is not None
        for step, old in enumerate(originals):
            new = Member(f"n{step}", cluster.dir)
            await _reconfigure(cluster, "add", new.name, f"--peer-urls={new.peer_url}")
            cluster.members.append(new)
            current = [m for m in cluster.members if m.running or m is new]
            new.start(cluster.initial_cluster(current), state="existing")
            await asyncio.to_thread(_wait_healthy, cluster, new)
            listed = json.loads(await asyncio.to_thread(cluster.ctl, "member", "list", "-w", "json"))
            member_id = next(m["ID"] for m in listed["members"] if m.get("name") == old.name)
            await _reconfigure(cluster, "remove", f"{member_id:x}", endpoints=[new.endpoint])
            old.kill()
            cluster.members.remove(old)
            await asyncio.to_thread(cluster.wait_for_leader)
            started = time.monotonic()
            status, text = await register(rig.http, rig.sidecars[0].admin,
                                          agent_body(f"moved-{step}", "moved", rig.backends[0].port, scale.ttl),
                                          timeout=15)
            outcome.figures[f"registration after removing {old.name}"] = \
                f"{status} after {time.monotonic() - started:.2f}s"
            assert status == 201, f"after removing {old.name}: {status} {text}"
            await rig.converged(rig.sidecars[1], "moved", {f"moved-{i}" for i in range(step + 1)})
        await asyncio.sleep(scale.settle / 2)
        await rig.stop_load(outcome)
        await rig.check_churn(outcome)
    return outcome


async def _reconfigure(cluster: EtcdCluster, *args: str, endpoints: list[str] | None = None,
                       timeout: float = 30) -> None:
    # etcd refuses a reconfiguration until every member has been connected for 5 s (strict-reconfig-check).
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.to_thread(cluster.ctl, "member", *args, endpoints=endpoints)
            return
        except subprocess.CalledProcessError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"member {' '.join(args)}: {exc.stderr.decode()}") from None
            await asyncio.sleep(0.5)


def _wait_healthy(cluster: EtcdCluster, member: Member, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = member.status()
        if status and int(status.get("leader", 0)):
            return
        time.sleep(0.1)
    raise AssertionError(f"new member {member.name} not in the cluster within {timeout:g}s; logs in {cluster.dir}")


async def resource_limits(cluster: EtcdCluster, prefix: str, scale: Scale, limit: int = 128 << 20) -> Outcome:
    """One sidecar in a 128 MiB memory cgroup, pinned to one CPU, at full DNS + proxy load: RSS sampled."""
    outcome = Outcome("128 MiB, one CPU")
    cgroup = MemoryCgroup(limit).create()
    try:
        async with Rig(cluster.endpoints, prefix, scale, count=1,
                       wrap=[*cgroup.wrap(), "taskset", "-c", "0"]) as rig:
            process = rig.sidecars[0].process
            assert process is not None
            samples = [rss(process.pid)]
            rig.start_load(full=True, churn=False)
            ends = time.monotonic() + scale.limited
            while time.monotonic() < ends:
                await asyncio.sleep(0.5)
                samples.append(rss(process.pid))
            await rig.stop_load(outcome)
            outcome.figures["alive"] = rig.sidecars[0].alive()
            mib = [round(s / 2**20, 1) for s in samples]
            quarter = max(1, len(mib) // 4)
            outcome.figures["RSS MiB before load / after warm-up / peak / end"] = \
                (mib[0], mib[quarter], max(mib), mib[-1])
            outcome.figures["RSS growth after warm-up MiB"] = round(mib[-1] - mib[quarter], 1)
            outcome.figures["cgroup peak MiB"] = round(cgroup.peak() / 2**20, 1)
            outcome.figures["oom kills"] = cgroup.oom_kills()
            outcome.figures["load qps / rps"] = (scale.full_dns_qps, scale.full_proxy_rps)
            outcome.figures["DNS queries the sidecar counted"] = _metric(rig.sidecars[0], "sidecar_dns_queries_total")
    finally:
        cgroup.cleanup()
    return outcome


async def frozen_member(cluster: EtcdCluster, prefix: str, scale: Scale, freeze: float | None = None) -> Outcome:
    """Each member in turn SIGSTOPped (for two lease TTLs, or ``freeze`` s) under load (whichever one
    carries the keepalive stream)."""
    outcome = Outcome("member SIGSTOP")
    ttl = float(scale.ttl.rstrip("s"))
    async with Rig(cluster.endpoints, prefix, scale) as rig:
        rig.start_load()
        owner = rig.sidecars[0]
        for member in cluster.members:
            assert member.process is not None
            member.process.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(2 * ttl if freeze is None else freeze)
            finally:
                member.process.send_signal(signal.SIGCONT)
            await asyncio.to_thread(cluster.wait_for_leader)
        await rig.stop_load(outcome)
        outcome.figures["re-registrations (a lease was lost)"] = \
            _metric(owner, "sidecar_registry_reregistrations_total")
        outcome.figures["keepalive failures"] = _metric(owner, "sidecar_registry_keepalive_failures_total")
        assert rig.churn is not None
        outcome.figures["refused registrations"] = sorted(rig.churn.pending.items())
        await rig.check_churn(outcome)
    return outcome
