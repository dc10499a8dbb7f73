"""Proxy benchmark: wrk against the sidecar proxy, haproxy (1 thread) and nginx (1 worker)
in front of the same 3 nginx backends, and directly against one backend, in alternating
rounds. The sidecar at its defaults (weighted_random, sticky cookie; wrk never sends the
cookie back, so every response sets it), the same with tracing on at 1% (spans exported
to bench/proxy/otlp_sink.py), and round_robin without sticky sessions.

    python bench/proxy/run.py [--rounds 3] [--duration 5] [--connections 50] [--baseline DIR]

--baseline DIR adds "sidecar defaults @ baseline": the serve.py of another checkout (e.g.
``git worktree add /tmp/before <commit>``), measured in the same alternating rounds.

Every listener is on 127.0.0.1; every process this starts is stopped by its PID.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@dataclass
class Target:
    name: str
    port: int
    host: str = "chat.agents.local"
    headers: tuple[str, ...] = ()
    pid: int = 0
    cpu: float = 0.0
    cpu_user: float = 0.0
    rss: bool = False
    requests: int = 0
    results: dict[int, list[dict[str, float]]] = field(default_factory=dict)


def wrk(target: Target, connections: int, duration: int) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-H", f"Host: {target.host}"]
    for header in target.headers:
        cmd += ["-H", header]
    cmd.append(f"http://127.0.0.1:{target.port}/")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        value, unit = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1.0, "ms": 1000.0, "s": 1e6}[unit]

    errors = 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p50": pct("50"), "p99": pct("99"), "errors": errors, "requests": requests}


def cpu_seconds(pid: int, user_only: bool = False) -> float:
    """User + system (or user) CPU of ``pid`` and its live children (nginx workers)."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(c) for c in children.read_text().split()]
    total = 0
    for each in pids:
        fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + (0 if user_only else int(fields[12]))
    return total / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--baseline", type=Path, help="another checkout whose round_robin sidecar runs alongside")
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "haproxy"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    log = open(tmp / "stderr.log", "ab")

    def start(cmd: list[str], **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, **kw)  # type: ignore[call-overload]
        procs.append(proc)
        return proc

    try:
        backend_ports = [free_port() for _ in range(3)]
        servers = "\n".join(
            f"server {{ listen 127.0.0.1:{p}; access_log off; location / {{ return 200 'hello from {i}\\n'; }} }}"
            for i, p in enumerate(backend_ports))
        nginx_port = free_port()
        upstream = " ".join(f"server 127.0.0.1:{p};" for p in backend_ports)
        (tmp / "backends.conf").write_text(f"""
daemon off; worker_processes 1; pid {tmp}/backends.pid; error_log {tmp}/backends.err;
events {{ worker_connections 4096; }}
http {{ {servers} }}
""")
        (tmp / "nginx.conf").write_text(f"""
daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err;
events {{ worker_connections 4096; }}
http {{
  upstream agents {{ {upstream} keepalive 64; }}
  server {{ listen 127.0.0.1:{nginx_port}; access_log off;
    location / {{ proxy_pass http://agents; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
}}
""")
        haproxy_port = free_port()
        (tmp / "haproxy.cfg").write_text(f"""
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{haproxy_port}
  default_backend agents
backend agents
  balance roundrobin
  http-reuse always
""" + "".join(f"  server b{i} 127.0.0.1:{p}\n" for i, p in enumerate(backend_ports)))
        start(["nginx", "-c", str(tmp / "backends.conf"), "-p", str(tmp)])
        for port in backend_ports:
            wait_port(port)
        nginx = start(["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)])
        haproxy = start(["haproxy", "-f", str(tmp / "haproxy.cfg")])
        agents = [a for p in backend_ports for a in ("--agent", f"127.0.0.1:{p}")]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
            env.pop(var, None)
        targets = [Target("direct (one nginx backend)", backend_ports[0]),
                   Target("haproxy 1 thread, roundrobin", haproxy_port, pid=haproxy.pid),
                   Target("nginx 1 worker, keepalive", nginx_port, pid=nginx.pid)]
        sink_port = free_port()
        start([sys.executable, str(HERE / "otlp_sink.py"), "--port", str(sink_port)], env=env)
        defaults = ["--algorithm", "weighted_random", "--sticky"]
        variants = [("sidecar defaults", defaults, ()),
                    ("sidecar defaults + tracing 1%", [*defaults, "--otlp-endpoint",
                                                       f"http://127.0.0.1:{sink_port}/v1/traces",
                                                       "--sample-ratio", "0.01"], ()),
                    ("sidecar round_robin, sticky off", ["--algorithm", "round_robin"], ())]
        runs = [(name, extra, headers, ROOT) for name, extra, headers in variants]
        if args.baseline is not None:
            runs.append(("sidecar defaults @ baseline", defaults, (), args.baseline.resolve()))
        for name, extra, headers, root in runs:
            port = free_port()
            proc = start([sys.executable, str(root / "bench" / "proxy" / "serve.py"), "--port", str(port), *agents,
                          *extra], env=dict(env, PYTHONPATH=str(root)))
            targets.append(Target(name, port, headers=headers, pid=proc.pid, rss=True))
        for target in targets:
            try:
                wait_port(target.port)
            except RuntimeError:
                sys.exit(f"{target.name} did not start:\n" + (tmp / "stderr.log").read_text())
            wrk(target, 10, 1)  # warm up (pools, caches)
        for round_ in range(args.rounds):
            order = targets if round_ % 2 == 0 else list(reversed(targets))
            for target in order:
                for connections in (args.connections, 1):
                    before = cpu_seconds(target.pid) if target.pid else 0.0
                    before_user = cpu_seconds(target.pid, user_only=True) if target.pid else 0.0
                    result = wrk(target, connections, args.duration)
                    if target.pid:
                        target.cpu += cpu_seconds(target.pid) - before
                        target.cpu_user += cpu_seconds(target.pid, user_only=True) - before_user
                        target.requests += int(result["requests"])
                    target.results.setdefault(connections, []).append(result)
        direct_p50 = statistics.median(r["p50"] for r in targets[0].results[1])
        haproxy_rps = statistics.median(r["rps"] for r in targets[1].results[args.connections])
        print(f"\nwrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} alternating rounds, medians:\n")
        print(f"| target | req/s (c{args.connections}) | x haproxy | p50 us | p99 us | errors | "
              "p50 us at c1 | added p50 us at c1 | p99 us at c1 | proxy CPU us/req (user + sys) | RSS MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for target in targets:
            load = target.results[args.connections]
            single = target.results[1]
            rps = statistics.median(r["rps"] for r in load)
            p50_c1 = statistics.median(r["p50"] for r in single)
            rss = f"{rss_kib(target.pid) / 1024:.0f}" if target.pid and target.rss else "-"
            cpu = "-"
            if target.requests:
                user = target.cpu_user * 1e6 / target.requests
                system = (target.cpu - target.cpu_user) * 1e6 / target.requests
                cpu = f"{target.cpu * 1e6 / target.requests:.0f} ({user:.0f} + {system:.0f})"
            p99_c1 = statistics.median(r["p99"] for r in single)
            p50 = statistics.median(r["p50"] for r in load)
            p99 = statistics.median(r["p99"] for r in load)
            errors = sum(int(r["errors"]) for r in load + single)
            print(f"| {target.name} | {rps:,.0f} | {rps / haproxy_rps:.2f} | {p50:.0f} | {p99:.0f} | {errors} | "
                  f"{p50_c1:.0f} | {p50_c1 - direct_p50:+.0f} | {p99_c1:.0f} | {cpu} | {rss} |")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                peer = Path(str(proc.args[0])).name in ("nginx", "haproxy")  # type: ignore[index]
                os.kill(proc.pid, signal.SIGQUIT if peer else signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
