"""dnsperf against the sidecar's DNS and dnsmasq, same data, alternating rounds, in one run.

    python bench/dns/run.py [--rounds 3] [--seconds 10] [--loop uvloop|asyncio]

Both servers serve 100 capabilities x 3 agents (dnsmasq through a generated
--addn-hosts file and --srv-host lines); the query file asks A and SRV of every
capability. Per round and server: one full-load run (``-v``, per-query
latencies) and one at ``-Q 2000``. Then the forwarded-query rate: the sidecar
forwarding names outside its zone to the dnsmasq instance, with its forward
cache on and off, against dnsmasq asked directly. dnsmasq gives its answers a
30 s TTL (``--local-ttl``; its default, 0, would forbid any cache to keep them).
Prints a Markdown table; everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CAPS, PER_CAP = 100, 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def address(n: int) -> str:
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"  # the same formula as serve.py


def write_inputs(work: Path) -> tuple[Path, Path, Path, Path]:
    hosts, conf = work / "hosts", work / "dnsmasq.conf"
    host_lines, conf_lines = [], []
    for c in range(CAPS):
        for a in range(PER_CAP):
            n = c * PER_CAP + a
            host_lines.append(f"{address(n)} cap{c}.agents.local a{n}.id.agents.local")
            conf_lines.append(f"srv-host=cap{c}.agents.local,a{n}.id.agents.local,{8000 + a},0,100")
    # Names outside the sidecar's zone, for the forwarding run.
    host_lines += [f"192.0.2.{i % 250 + 1} host{i}.bench.test" for i in range(100)]
    hosts.write_text("\n".join(host_lines) + "\n")
    conf.write_text("\n".join(conf_lines) + "\n")
    queries = work / "queries.txt"
    queries.write_text("".join(f"cap{c}.agents.local A\ncap{c}.agents.local SRV\n" for c in range(CAPS)))
    forwarded = work / "forwarded.txt"
    forwarded.write_text("".join(f"host{i}.bench.test A\n" for i in range(100)))
    return hosts, conf, queries, forwarded


def start_dnsmasq(port: int, hosts: Path, conf: Path) -> subprocess.Popen[bytes]:
    command = ["/usr/sbin/dnsmasq", "--keep-in-foreground", f"--port={port}", "--listen-address=127.0.0.1",
               "--bind-interfaces", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}", f"--conf-file={conf}",
               "--pid-file=", "--user=root", "--local=/agents.local/", "--local=/bench.test/", "--cache-size=10000",
               "--dns-forward-max=1000", "--local-ttl=30"]
    print("$", " ".join(command), file=sys.stderr)
    return subprocess.Popen(command)


def start_sidecar(port: int, loop: str, upstream: str = "none", cache_size: int | None = None,
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
    command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(data), "-l", str(seconds), *extra]
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


def ms(seconds: Any) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dnsbench-"))
    hosts, conf, queries, forwarded = write_inputs(work)
    dnsmasq_port, sidecar_port, forwarding_port, uncached_port = free_port(), free_port(), free_port(), free_port()
    processes = []
    try:
        dnsmasq = start_dnsmasq(dnsmasq_port, hosts, conf)
        processes.append(dnsmasq)
        processes.append(start_sidecar(sidecar_port, args.loop))
        time.sleep(1.0)  # dnsmasq reads its files
        targets = {"sidecar": sidecar_port, "dnsmasq": dnsmasq_port}
        rows: list[tuple[int, str, str, dict[str, Any]]] = []
        for round_ in range(1, args.rounds + 1):
            order = list(targets) if round_ % 2 else list(reversed(targets))
            for name in order:
                rows.append((round_, name, "full", dnsperf(targets[name], queries, args.seconds, ["-v"])))
            for name in order:
                rows.append((round_, name, "2000", dnsperf(targets[name], queries, args.seconds,
                                                           ["-v", "-Q", "2000"])))
        upstream = f"127.0.0.1:{dnsmasq_port}"
        processes.append(start_sidecar(forwarding_port, args.loop, upstream=upstream))
        processes.append(start_sidecar(uncached_port, args.loop, upstream=upstream, cache_size=0))
        forward_rows = []
        for name, port in (("sidecar forwarding to dnsmasq, cache on", forwarding_port),
                           ("sidecar forwarding to dnsmasq, cache off", uncached_port),
                           ("dnsmasq direct", dnsmasq_port)):
            forward_rows.append((name, dnsperf(port, forwarded, args.seconds, [])))
    finally:
        for process in reversed(processes):
            stop(process)
    print(f"\nloop={args.loop}, {args.rounds} rounds x {args.seconds} s, {os.cpu_count()} CPUs\n")
    print("| round | server | load | qps | sent | lost | avg ms | p50 ms | p99 ms | rcodes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for round_, name, load, r in rows:
        print(f"| {round_} | {name} | {load} | {r['qps']:.0f} | {r['sent']:.0f} | {r['lost']:.0f} | {ms(r['avg'])} "
              f"| {ms(r.get('p50'))} | {ms(r.get('p99'))} | {r['rcodes']} |")
    full = {n: [r["qps"] for _, m, load, r in rows if m == n and load == "full"] for n in targets}
    ratio = statistics.median(full["sidecar"]) / statistics.median(full["dnsmasq"])
    print(f"\nmedian full-load qps: sidecar {statistics.median(full['sidecar']):.0f}, "
          f"dnsmasq {statistics.median(full['dnsmasq']):.0f}, ratio {ratio:.2f}x")
    print("\n| forwarded | qps | lost | avg ms | rcodes |\n|---|---|---|---|---|")
    for name, r in forward_rows:
        print(f"| {name} | {r['qps']:.0f} | {r['lost']:.0f} | {ms(r['avg'])} | {r['rcodes']} |")


if __name__ == "__main__":
    main()
