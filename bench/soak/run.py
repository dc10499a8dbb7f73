"""Soak: one `sidecar run` under mixed load with agent churn; RSS, fds, tasks and errors over time.

Usage: python bench/soak/run.py [--minutes 30] [--dns-qps 200] [--proxy-rps 100] [--churn-per-s 2]
                                [--out bench/soak/results.json] [--plot docs/soak.png]

A private etcd on tmpfs; three HTTP backends (aiohttp, in this process)
registered through the subject's `POST /v1/agents` as capability `soak`; the
subject is `bench/soak/subject.py` (exactly `sidecar run`, plus a sampler of
its asyncio task count). Load, all to 127.0.0.1: DNS `soak.agents.local A`
and `churn.agents.local SRV` at ``--dns-qps``; proxy `GET /` with `Host:
soak.agents.local` at ``--proxy-rps``; churn: ``--churn-per-s`` registrations
of short-lived `churn` agents per second through the admin API, each deleted
20 registrations later. Every 10 s: RSS, open fds, asyncio tasks of the
subject and the cumulative good/failed counts. Writes the samples as JSON and
a PNG of the curves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import dns.message
import dns.rcode
from aiohttp import web

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scale"))
from population import Sidecar, machine, rss_mb  # type: ignore[import-not-found]  # noqa: E402

from sidecar.dev import EmbeddedEtcd, free_port  # noqa: E402

COUNTS = ("dns_ok", "dns_failed", "dns_timeout", "proxy_ok", "proxy_failed", "churn_ok", "churn_failed")


async def backends(count: int) -> tuple[list[int], list[web.AppRunner]]:
    ports, runners = [], []
    for n in range(count):
        async def hello(request: web.Request, n: int = n) -> web.Response:
            return web.Response(text=f"backend {n}\n")

        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ports.append(port)
        runners.append(runner)
    return ports, runners


async def paced(rate: float, stop: asyncio.Event, one) -> None:
    """Call ``one()`` ``rate`` times a second (started as tasks, so a slow answer does not slow the pace)."""
    started, sent = time.perf_counter(), 0
    pending: set[asyncio.Task[None]] = set()
    while not stop.is_set():
        task = asyncio.create_task(one())
        pending.add(task)
        task.add_done_callback(pending.discard)
        sent += 1
        await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
    await asyncio.gather(*pending, return_exceptions=True)


class Load:
    def __init__(self, subject: Sidecar, counts: dict[str, int]) -> None:
        self.subject = subject
        self.counts = counts
        self.queries = [dns.message.make_query("soak.agents.local", "A"),
                        dns.message.make_query("churn.agents.local", "SRV")]
        self.sent = 0
        self.churned = 0
        self.failures: list[str] = []  # what went wrong, the first 100 (a count alone cannot be explained)

    def failed(self, what: str) -> None:
        if len(self.failures) < 100:
            self.failures.append(f"{time.strftime('%H:%M:%S')} {what}")

    async def dns_one(self) -> None:
        query = self.queries[self.sent % 2]
        self.sent += 1
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            await loop.sock_sendto(sock, query.to_wire(), ("127.0.0.1", self.subject.dns))
            reply = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(sock, 65535), 2.0))
            good = reply.rcode() == dns.rcode.NOERROR and (query.question[0].rdtype != 1 or len(reply.answer) == 1)
            outcome = "dns_ok" if good else "dns_failed"
            if not good:
                self.failed(f"dns {query.question[0]}: {dns.rcode.to_text(reply.rcode())}, {len(reply.answer)} rrsets")
        except TimeoutError:
            outcome = "dns_timeout"  # no reply within 2 s (lost, or this load generator fell behind)
            self.failed(f"dns {query.question[0]}: no reply in 2 s")
        except (OSError, dns.exception.DNSException) as exc:
            outcome = "dns_failed"
            self.failed(f"dns {query.question[0]}: {exc!r}")
        finally:
            sock.close()
        self.counts[outcome] += 1

    async def proxy_one(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(f"http://127.0.0.1:{self.subject.proxy}/",
                                   headers={"Host": "soak.agents.local"}) as response:
                body = await response.read()
                good = response.status == 200 and body.startswith(b"backend")
                if not good:
                    self.failed(f"proxy: {response.status} {body[:200]!r}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            good = False
            self.failed(f"proxy: {exc!r}")
        self.counts["proxy_ok" if good else "proxy_failed"] += 1

    async def churn_one(self, session: aiohttp.ClientSession) -> None:
        n = self.churned
        self.churned += 1
        admin = f"http://127.0.0.1:{self.subject.admin}/v1/agents"
        good = True
        try:
            async with session.post(admin, json={"id": f"churn{n}", "name": "churn", "address": "127.0.0.2",
                                                 "port": 9000 + n % 1000, "capabilities": ["churn"],
                                                 "ttl": "10s"}) as response:
                good = response.status == 201
                if not good:
                    self.failed(f"POST churn{n}: {response.status} {(await response.text())[:200]}")
            if n >= 20:
                async with session.delete(f"{admin}/churn{n - 20}") as response:
                    if response.status not in (200, 204):
                        good = False
                        self.failed(f"DELETE churn{n - 20}: {response.status} {(await response.text())[:200]}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            good = False
            self.failed(f"churn{n}: {exc!r}")
        self.counts["churn_ok" if good else "churn_failed"] += 1


def sample(subject: Sidecar, tasks_file: str, counts: dict[str, int], started: float) -> dict[str, float]:
    tasks = 0
    try:
        with open(tasks_file) as lines:
            tasks = int(lines.read().split()[-1])
    except (OSError, IndexError, ValueError):
        pass
    return {"t_s": round(time.time() - started, 1), "rss_mb": round(rss_mb(subject.pid), 1),
            "fds": len(os.listdir(f"/proc/{subject.pid}/fd")), "tasks": tasks, **counts}


def plot(samples: list[dict[str, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t_s"] / 60 for s in samples]
    figure, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    for axis, key, unit in ((axes[0], "rss_mb", "RSS MiB"), (axes[1], "fds", "open fds"),
                            (axes[2], "tasks", "asyncio tasks")):
        axis.plot(minutes, [s[key] for s in samples])
        axis.set_ylabel(unit)
        axis.set_ylim(bottom=0)
        axis.grid(True)
    for key in ("dns_failed", "dns_timeout", "proxy_failed", "churn_failed"):
        axes[3].plot(minutes, [s[key] for s in samples], label=key)
    axes[3].set_ylabel("failures (cumulative)")
    axes[3].set_xlabel("minutes")
    axes[3].set_ylim(bottom=0)
    axes[3].legend()
    axes[3].grid(True)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


async def main() -> tuple[argparse.Namespace, list[dict[str, float]], list[str]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--dns-qps", type=float, default=200.0)
    parser.add_argument("--proxy-rps", type=float, default=100.0)
    parser.add_argument("--churn-per-s", type=float, default=2.0)
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument("--plot", default=str(HERE.parent.parent / "docs" / "soak.png"))
    args = parser.parse_args()
    etcd = EmbeddedEtcd("soak")
    etcd.start()
    tasks_file = tempfile.mktemp(prefix="soak-tasks-", dir="/dev/shm")
    subject = Sidecar(etcd.endpoint, command=(sys.executable, str(HERE / "subject.py"), tasks_file),
                      log=args.out.removesuffix(".json") + ".log")
    counts = dict.fromkeys(COUNTS, 0)
    samples: list[dict[str, float]] = []
    load = Load(subject, counts)
    ports, runners = await backends(3)
    try:
        subject.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for n, port in enumerate(ports):
                async with session.post(f"http://127.0.0.1:{subject.admin}/v1/agents",
                                        json={"id": f"b{n}", "name": "backend", "address": "127.0.0.1",
                                              "port": port, "capabilities": ["soak"], "ttl": "10s"}) as response:
                    assert response.status == 201, await response.text()
            await asyncio.sleep(1.0)
            stop = asyncio.Event()
            started = time.time()
            # Churn first: until a `churn` agent exists, its SRV name is NXDOMAIN (correctly).
            generators = [asyncio.create_task(paced(args.churn_per_s, stop, lambda: load.churn_one(session)))]
            await asyncio.sleep(2.0)
            generators += [asyncio.create_task(paced(args.dns_qps, stop, load.dns_one)),
                           asyncio.create_task(paced(args.proxy_rps, stop, lambda: load.proxy_one(session)))]
            samples.append(sample(subject, tasks_file, counts, started))
            while time.time() - started < args.minutes * 60:
                await asyncio.sleep(10.0)
                samples.append(sample(subject, tasks_file, counts, started))
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
            stop.set()
            await asyncio.gather(*generators)
    finally:
        subject.stop()
        for runner in runners:
            await runner.cleanup()
        etcd.cleanup()
        Path(tasks_file).unlink(missing_ok=True)  # noqa: ASYNC240 (a tmpfs file, at the end)
    return args, samples, load.failures


def report(args: argparse.Namespace, samples: list[dict[str, float]], failures: list[str]) -> None:
    result = {"machine": machine(), "minutes": args.minutes, "dns_qps": args.dns_qps, "proxy_rps": args.proxy_rps,
              "churn_per_s": args.churn_per_s, "samples": samples, "failures": failures}
    with open(args.out, "w") as out:
        json.dump(result, out, indent=1)
    plot(samples, args.plot, f"soak {args.minutes:g} min: DNS {args.dns_qps:g} qps, proxy {args.proxy_rps:g} rps, "
                             f"churn {args.churn_per_s:g}/s")
    print(json.dumps(samples[-1]))
    for line in failures:
        print(line)


if __name__ == "__main__":
    os.environ.pop("HTTP_PROXY", None)
    report(*asyncio.run(main()))
