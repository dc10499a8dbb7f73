"""dnsperf against the sidecar's DNS and dnsmasq, same data, alternating rounds, in one run.

    python bench/dns/run.py [--rounds 3] [--seconds 5] [--target daemon|component] [--loop uvloop|asyncio]

By default this measures what ``../shared/perf/dns-vs-dnsmasq`` measures: the
real daemon (``python -m sidecar run`` at its default settings, fed by a
private etcd holding 100 capabilities x 3 agents) against dnsmasq holding the
same records (a generated ``--addn-hosts`` file and ``--srv-host`` lines), both
asked ``cap<N>.agents.local A`` and ``_cap<N>._tcp.agents.local SRV`` for the
100 capabilities in a shuffled order with ``dnsperf -c 10 -t 2`` and no
``-v``. Per round and server: one full-load run, then one at ``-Q 2000`` with
``-v`` for per-query latencies (p50, p99). Then the forwarded-query rate: a
daemon forwarding names outside its zone to the dnsmasq instance, with its
forward cache on and off, against dnsmasq asked directly.

``--target component`` puts ``bench/dns/serve.py`` (the ``DnsServer`` over a
catalog filled in process, no etcd, no other component) in the daemon's place,
for telling the DNS code's cost from the rest of the process.

dnsmasq gives its answers a 30 s TTL (``--local-ttl``; its default, 0, would
forbid any cache to keep them). Prints a Markdown table; everything talks to
127.0.0.1 only. Needs etcd, dnsperf and dnsmasq on PATH.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from serve import bench_agents  # type: ignore[import-not-found]

from sidecar.dev import EmbeddedEtcd
from sidecar.model import Agent

HERE = Path(__file__).resolve().parent
CAPS, PER_CAP = 100, 3
ZONE = "agents.local"


def free_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1 (the daemon's DNS listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def write_inputs(work: Path, agents: dict[str, Agent]) -> tuple[Path, Path, Path, Path]:
    hosts, conf = work / "hosts", work / "dnsmasq.conf"
    host_lines, conf_lines = [], []
    for agent in agents.values():
        (capability,) = agent.capabilities
        host_lines.append(f"{agent.address} {capability}.{ZONE}")
        conf_lines.append(f"srv-host=_{capability}._tcp.{ZONE},{agent.id}.id.{ZONE},{agent.port},0,100")
    # Names outside the sidecar's zone, for the forwarding runs.
    host_lines += [f"192.0.2.{i % 250 + 1} host{i}.bench.test" for i in range(100)]
    hosts.write_text("\n".join(host_lines) + "\n")
    conf.write_text("\n".join(conf_lines) + "\n")
    lines = [f"cap{c}.{ZONE} A\n_cap{c}._tcp.{ZONE} SRV\n" for c in range(CAPS)]
    random.Random(1).shuffle(lines)
    queries = work / "queries.txt"
    queries.write_text("".join(lines))
    forwarded = work / "forwarded.txt"
    forwarded.write_text("".join(f"host{i}.bench.test A\n" for i in range(100)))
    return hosts, conf, queries, forwarded


def put_agents(etcd: EmbeddedEtcd, agents: dict[str, Agent]) -> None:
    """Write the agents through etcd's JSON gateway (no lease: they stay for the run)."""
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    for key, agent in agents.items():
        body = json.dumps({"key": b64(key.encode()), "value": b64(agent.to_bytes())}).encode()
        request = urllib.request.Request(f"{etcd.endpoint}/v3/kv/put", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()


def start_dnsmasq(port: int, hosts: Path, conf: Path) -> subprocess.Popen[bytes]:
    command = ["dnsmasq", "--keep-in-foreground", f"--port={port}", "--listen-address=127.0.0.1",
               "--bind-interfaces", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}", f"--conf-file={conf}",
               "--pid-file=", "--user=root", f"--local=/{ZONE}/", "--local=/bench.test/", "--cache-size=10000",
               "--dns-forward-max=1000", "--local-ttl=30"]
    print("$", " ".join(command), file=sys.stderr)
    return subprocess.Popen(command)


def start_daemon(etcd: EmbeddedEtcd, work: Path, port: int, loop: str, upstream: str | None = None,
                 cache_size: int | None = None) -> subprocess.Popen[bytes]:
    """``sidecar run`` at its defaults but for the listeners (and the forwarding settings asked for)."""
    admin = free_port()
    command = [sys.executable, "-m", "sidecar", "run", "--etcd-endpoints", etcd.endpoint,
               "--dns-listen", f"127.0.0.1:{port}", "--proxy-listen", f"127.0.0.1:{free_port()}",
               "--admin-listen", f"127.0.0.1:{admin}", "--grpc-listen", f"127.0.0.1:{free_port()}"]
    if loop != "uvloop":
        command += ["--loop", loop]
    if upstream is not None:
        command += ["--upstream-dns", upstream]
    if cache_size is not None:
        config = work / f"config-{port}.yaml"
        config.write_text(json.dumps({"dns": {"cache_size": cache_size}}))  # JSON is YAML
        command += ["--config", str(config)]
    print("$", " ".join(command), file=sys.stderr)
    with open(work / f"sidecar-{port}.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"sidecar exited with {process.returncode}; see {work}/sidecar-{port}.log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as response:
                if response.status == 200:
                    return process
        except OSError:
            pass
        time.sleep(0.1)
    stop(process)
    raise SystemExit(f"sidecar not ready in 30 s; see {work}/sidecar-{port}.log")


def start_component(port: int, loop: str, upstream: str = "none", cache_size: int | None = None,
                    ) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(HERE / "serve.py"), f"--port={port}", f"--upstream={upstream}"]
    if cache_size is not None:
        command.append(f"--cache-size={cache_size}")
    if loop == "asyncio":
        command.append("--loop=asyncio")
    print("$", " ".join(command), file=sys.stderr)
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    assert line.startswith("port "), line
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def dnsperf(port: int, data: Path, seconds: int, extra: list[str]) -> dict[str, float | str]:
    command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(data), "-l", str(seconds), "-c", "10",
               "-t", "2", *extra]
    print("$", " ".join(command), file=sys.stderr)
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    latencies = sorted(float(m) for m in re.findall(r"^> \S+ \S+ \S+ ([0-9.]+)$", output, re.M))
    result: dict[str, float | str] = {
        "rcodes": re.search(r"Response codes:\s+(.*)", output).group(1).strip(),  # type: ignore[union-attr]
        "qps": float(re.search(r"Queries per second:\s+([0-9.]+)", output).group(1)),  # type: ignore[union-attr]
        "sent": float(re.search(r"Queries sent:\s+(\d+)", output).group(1)),  # type: ignore[union-attr]
        "lost": float(re.search(r"Queries lost:\s+(\d+)", output).group(1)),  # type: ignore[union-attr]
        "avg": float(re.search(r"Average Latency \(s\):\s+([0-9.]+)", output).group(1)),  # type: ignore[union-attr]
    }
    if latencies:
        result["p50"] = latencies[len(latencies) // 2]
        result["p99"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return result


def answers_a(port: int, name: str) -> int:
    """How many A records ``name`` gets (the sanity check the reference script makes)."""
    import dns.message
    import dns.query

    response = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=5)
    return sum(len(rrset) for rrset in response.answer)


def ms(seconds: Any) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--target", choices=("daemon", "component"), default="daemon")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dnsbench-"))
    agents = bench_agents(CAPS, PER_CAP)
    hosts, conf, queries, forwarded = write_inputs(work, agents)
    dnsmasq_port, sidecar_port, forwarding_port, uncached_port = free_port(), free_port(), free_port(), free_port()
    upstream = f"127.0.0.1:{dnsmasq_port}"
    processes = []
    etcd = None
    try:
        if args.target == "daemon":
            etcd = EmbeddedEtcd("bench-dns")
            etcd.start()
            put_agents(etcd, agents)

            def start(port: int, upstream: str | None = None, cache_size: int | None = None,
                      ) -> subprocess.Popen[bytes]:
                assert etcd is not None
                return start_daemon(etcd, work, port, args.loop, upstream, cache_size)
        else:
            def start(port: int, upstream: str | None = None, cache_size: int | None = None,
                      ) -> subprocess.Popen[bytes]:
                return start_component(port, args.loop, upstream or "none", cache_size)
        processes.append(start_dnsmasq(dnsmasq_port, hosts, conf))
        processes.append(start(sidecar_port))
        time.sleep(1.0)  # dnsmasq reads its files
        found = answers_a(sidecar_port, "cap7.agents.local")
        if found != PER_CAP:
            raise SystemExit(f"the sidecar answered cap7.agents.local A with {found} of {PER_CAP} records")
        targets = {"sidecar": sidecar_port, "dnsmasq": dnsmasq_port}
        rows: list[tuple[int, str, str, dict[str, Any]]] = []
        for round_ in range(1, args.rounds + 1):
            order = list(targets) if round_ % 2 else list(reversed(targets))
            for name in order:
                rows.append((round_, name, "full", dnsperf(targets[name], queries, args.seconds, [])))
            for name in order:
                rows.append((round_, name, "2000", dnsperf(targets[name], queries, args.seconds,
                                                           ["-v", "-Q", "2000"])))
        processes.append(start(forwarding_port, upstream=upstream))
        processes.append(start(uncached_port, upstream=upstream, cache_size=0))
        forward_rows = []
        for name, port in (("sidecar forwarding to dnsmasq, cache on", forwarding_port),
                           ("sidecar forwarding to dnsmasq, cache off", uncached_port),
                           ("dnsmasq direct", dnsmasq_port)):
            forward_rows.append((name, dnsperf(port, forwarded, args.seconds, [])))
    finally:
        for process in reversed(processes):
            stop(process)
        if etcd is not None:
            etcd.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ntarget={args.target}, loop={args.loop}, {args.rounds} rounds x {args.seconds} s, "
          f"{os.cpu_count()} CPUs, {cpu_model()}\n")
    print("| round | server | load | qps | sent | lost | avg ms | p50 ms | p99 ms | rcodes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for round_, name, load, r in rows:
        print(f"| {round_} | {name} | {load} | {r['qps']:.0f} | {r['sent']:.0f} | {r['lost']:.0f} | {ms(r['avg'])} "
              f"| {ms(r.get('p50'))} | {ms(r.get('p99'))} | {r['rcodes']} |")
    full = {n: [r["qps"] for _, m, load, r in rows if m == n and load == "full"] for n in targets}
    lost = sum(r["lost"] for _, m, load, r in rows if m == "sidecar" and load == "full")
    ratio = statistics.median(full["sidecar"]) / statistics.median(full["dnsmasq"])
    p99 = [r["p99"] for _, m, load, r in rows if m == "sidecar" and load == "2000" and "p99" in r]
    print(f"\nmedian full-load qps: sidecar {statistics.median(full['sidecar']):.0f}, "
          f"dnsmasq {statistics.median(full['dnsmasq']):.0f}, lost {lost:.0f}: ratio {ratio:.2f}x dnsmasq; "
          f"sidecar p99 at 2,000 qps {ms(min(p99, default=None))}-{ms(max(p99, default=None))} ms")
    print("\n| forwarded | qps | lost | avg ms | rcodes |\n|---|---|---|---|---|")
    for name, r in forward_rows:
        print(f"| {name} | {r['qps']:.0f} | {r['lost']:.0f} | {ms(r['avg'])} | {r['rcodes']} |")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU model unknown"


if __name__ == "__main__":
    main()
