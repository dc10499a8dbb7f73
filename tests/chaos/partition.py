"""A network partition of one sidecar from etcd, made with network namespaces (not a killed process).

etcd and a control sidecar run in one namespace, the partitioned sidecar and its
agents' backends in the other; the only link is a veth on a private /30. The cut
takes the sidecar's end of the veth down, so etcd is unreachable (no RST, no
refused connection) while the sidecar keeps serving from its last snapshot.
Everything is observed from inside the namespaces (`ip netns exec` curl and dig).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .fleet import SidecarProcess, agent_body
from .isolation import ETCD_SIDE, NetnsPair
from .load import Tally
from .rig import Outcome, Scale


def _run(prefix: list[str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=15)


class _Inside:
    """curl and dig run in one namespace."""

    def __init__(self, prefix: list[str]) -> None:
        self.prefix = prefix

    def post(self, url: str, body: dict[str, object]) -> int:
        result = _run(self.prefix, "curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                      "-H", "Content-Type: application/json", "-d", json.dumps(body), url)
        return int(result.stdout or 0)

    def ids(self, admin: str, capability: str) -> set[str] | None:
        result = _run(self.prefix, "curl", "-sf", "-m", "2", f"{admin}/v1/agents?capability={capability}")
        if result.returncode != 0:
            return None
        return {agent["id"] for agent in json.loads(result.stdout)["agents"]}

    def answers(self, port: int, name: str) -> int | None:
        result = _run(self.prefix, "dig", "@127.0.0.1", "-p", str(port), name, "A", "+short", "+time=1", "+tries=1")
        if result.returncode != 0:
            return None
        return len([line for line in result.stdout.splitlines() if line.strip()])

    def proxied(self, port: int, capability: str) -> int:
        result = _run(self.prefix, "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                      "-H", f"Host: {capability}.agents.local", f"http://127.0.0.1:{port}/")
        return int(result.stdout or 0)


async def _converged(inside: _Inside, admin: str, capability: str, expected: set[str], timeout: float) -> float:
    started = time.monotonic()
    while True:
        seen = await asyncio.to_thread(inside.ids, admin, capability)
        if seen == expected:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{capability} at {admin}: {seen} != {expected} after {timeout:g}s")
        await asyncio.sleep(0.05)


def _etcd(pair: NetnsPair, data: str) -> subprocess.Popen[bytes]:
    """One etcd member in the etcd namespace, on its loopback and on the veth."""
    with open(os.path.join(data, "etcd.log"), "ab") as log:
        return subprocess.Popen(
            [*pair.exec(pair.etcd), "etcd", "--name", "p0", "--data-dir", os.path.join(data, "data"),
             "--listen-client-urls", f"http://127.0.0.1:2379,http://{ETCD_SIDE}:2379",
             "--advertise-client-urls", f"http://{ETCD_SIDE}:2379",
             "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls",
             "http://127.0.0.1:2380", "--initial-cluster", "p0=http://127.0.0.1:2380", "--log-level", "warn"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)


def _backend(pair: NetnsPair, port: int, directory: str) -> subprocess.Popen[bytes]:
    """An agent backend (a static HTTP server answering 200 for /) in the sidecar namespace."""
    return subprocess.Popen(
        [*pair.exec(pair.sidecar), sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=directory)


async def partition(prefix: str, scale: Scale) -> Outcome:
    outcome = Outcome("network partition")
    pair = NetnsPair().create()
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    data = tempfile.mkdtemp(prefix="chaos-netns-etcd-", dir=base)
    children: list[subprocess.Popen[bytes]] = []
    sidecars: list[SidecarProcess] = []
    try:
        children.append(_etcd(pair, data))
        etcd_side, sidecar_side = _Inside(pair.exec(pair.etcd)), _Inside(pair.exec(pair.sidecar))
        control = SidecarProcess(["http://127.0.0.1:2379"], prefix, wrap=pair.exec(pair.etcd))
        cut_off = SidecarProcess([f"http://{ETCD_SIDE}:2379"], prefix, wrap=pair.exec(pair.sidecar))
        sidecars += [control, cut_off]
        backends = [8101, 8102]
        children += [_backend(pair, port, data) for port in backends]
        for sidecar in sidecars:
            sidecar.start()
        await asyncio.to_thread(control.wait_ready, 60, pair.exec(pair.etcd))
        await asyncio.to_thread(cut_off.wait_ready, 60, pair.exec(pair.sidecar))
        stable = set()
        for i, port in enumerate(backends):
            body = agent_body(f"stable-{i}", "stable", port, "3s")
            assert await asyncio.to_thread(etcd_side.post, control.admin + "/v1/agents", body) == 201
            stable.add(f"stable-{i}")
        await _converged(sidecar_side, cut_off.admin, "stable", stable, timeout=20)
        assert await asyncio.to_thread(sidecar_side.proxied, cut_off.proxy_port, "stable") == 200

        pair.cut()
        cut_at = time.monotonic()
        change = agent_body("during-1", "during", backends[0], "3s")
        outcome.figures["registration through the control sidecar during the cut"] = \
            await asyncio.to_thread(etcd_side.post, control.admin + "/v1/agents", change)
        dns, proxy = Tally(), Tally()
        while time.monotonic() - cut_at < scale.outage:
            answers = await asyncio.to_thread(sidecar_side.answers, cut_off.dns_port, "stable.agents.local")
            dns.good() if answers == len(stable) else dns.bad(f"{answers} answers")
            status = await asyncio.to_thread(sidecar_side.proxied, cut_off.proxy_port, "stable")
            proxy.good() if status == 200 else proxy.bad(f"status {status}")
        outcome.figures["stale view during the cut"] = sorted(
            await asyncio.to_thread(sidecar_side.ids, cut_off.admin, "during") or [])
        outcome.figures["cut s"] = round(time.monotonic() - cut_at, 1)
        pair.heal()
        outcome.figures["converged after heal s"] = round(
            await _converged(sidecar_side, cut_off.admin, "during", {"during-1"}, timeout=30), 2)
        outcome.dns, outcome.proxy = dns, proxy
        outcome.figures["sidecar alive"] = cut_off.alive()
    finally:
        for sidecar in sidecars:
            await asyncio.to_thread(sidecar.stop)
        for child in children:
            child.kill()
            child.wait()
        pair.cleanup()
        shutil.rmtree(data, ignore_errors=True)
    return outcome
