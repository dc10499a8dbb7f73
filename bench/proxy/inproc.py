"""The proxy's own Python cost per request, without sockets: the real Relay, ClientConnection and
Upstream protocols fed a request and a response through fake transports, on the fast path
(pooled upstream connections). Much steadier than wrk on a shared machine; the kernel's share
(four syscalls and the wake-ups they cause) is not in this number.

    python bench/proxy/inproc.py [--algorithm weighted_random] [--no-sticky] [--session] [--requests 100000]
        [--access-log] [--tracing RATIO] [--no-a2a] [--json-post] [--rounds N] [--profile]

The defaults are the daemon's: weighted_random, sticky sessions on, and (as with wrk) a
client that never sends the affinity cookie back, so every response sets it.

``--json-post`` sends a small JSON POST that is not a JSON-RPC call instead of the GET:
with A2A routing on, its body is read (by the connection's task) before an agent is
chosen, so it leaves the fast path; each request then waits for the loop's turns it
needs (the same driver with A2A off, where it stays on the fast path). ``--rounds N``
measures A2A on and off in one process, N rounds, alternating which goes first, and
prints each round and the median and range of each (there is no setting that turns
A2A routing off: the daemon always builds it; off is a relay built without it).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from sidecar.catalog import Catalog, Reset
from sidecar.config import Settings, build
from sidecar.metrics import Metrics
from sidecar.model import Agent
from sidecar.proxy.relay import Relay
from sidecar.proxy.server import ProxyServer
from sidecar.proxy.upstream import Upstream
from sidecar.tracing import Tracing

REQUEST = b"GET / HTTP/1.1\r\nHost: chat.agents.local\r\n\r\n"
# A JSON body that is not a JSON-RPC call (what a REST tool call looks like).
JSON_BODY = b'{"query": "weather in Lisbon", "units": "metric", "limit": 3}'
JSON_POST = (b"POST /v1/search HTTP/1.1\r\nHost: chat.agents.local\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n%s" % (len(JSON_BODY), JSON_BODY))
# What the benchmark's nginx backends answer.
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 08:29:46 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nhello from 0\n")


class Transport:
    """Counts writes; everything else is a no-op."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def writelines(self, data: object) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


async def measure(args: argparse.Namespace, a2a: bool) -> tuple[float, float]:
    """(best CPU seconds per request, Python function calls per request) of one relay."""
    agents = {f"/services/bench/a{i}": Agent(id=f"a{i}", name="bench", address="127.0.0.1", port=18000 + i,
                                            capabilities=("chat",)) for i in range(3)}
    catalog = Catalog()
    catalog.apply([Reset(1, agents)])
    endpoint = args.endpoint
    settings = build(Settings, {"load_balancer": {"algorithm": args.algorithm}, "sticky": {"enabled": args.sticky},
                                "proxy": {"access_log": args.access_log},
                                "tracing": {"otlp_endpoint": endpoint, "sample_ratio": args.tracing or 0.0}})
    tracing = Tracing.build(settings.tracing)
    proxy = ProxyServer(settings, catalog, Metrics().proxy, tracing=tracing)
    # As the daemon builds it: A2A routing on (--no-a2a measures the relay without it).
    relay = Relay(settings.proxy, settings.dns.domain, catalog, proxy.policy, proxy.metrics, tracing=tracing,
                  a2a=proxy.a2a if a2a else None)
    for agent in agents.values():
        conn = Upstream(relay, (agent.address, agent.port))
        conn.connection_made(Transport())  # type: ignore[arg-type]
        relay.pool.release(conn)
    client = relay.protocol()
    transport = Transport()
    client.connection_made(transport)  # type: ignore[arg-type]
    request = JSON_POST if args.json_post else REQUEST
    if args.session:
        head, _, body = request.partition(b"\r\n\r\n")
        request = head + b"\r\nX-Session-Id: bench\r\n\r\n" + body

    def one() -> None:
        client.data_received(request)
        upstream = client.upstream
        assert upstream is not None, "not on the fast path"
        upstream.data_received(RESPONSE)

    async def one_waiting() -> None:
        # The request may go through the connection's task (an A2A candidate): let the loop turn until
        # it has been sent, and again until it is answered (polled: an Event would add its own cost).
        client.data_received(request)
        while client.upstream is None:  # noqa: ASYNC110
            await asyncio.sleep(0)
        client.upstream.data_received(RESPONSE)
        while client.busy:  # noqa: ASYNC110
            await asyncio.sleep(0)

    async def run(count: int) -> None:
        if args.json_post:
            for _ in range(count):
                await one_waiting()
        else:
            for _ in range(count):
                one()

    await run(2000)
    best = float("inf")
    for _ in range(5):
        started = time.process_time()  # CPU time: steadier than wall time on a shared machine
        await run(args.requests)
        best = min(best, (time.process_time() - started) / args.requests)
    assert transport.writes >= 2000 + 5 * args.requests
    profiler = cProfile.Profile()
    profiler.enable()
    await run(args.requests)
    profiler.disable()
    stats = pstats.Stats(profiler)
    calls = stats.total_calls / args.requests  # type: ignore[attr-defined]
    if args.profile:
        stats.sort_stats("tottime").print_stats(25)
    relay.close()
    if tracing is not None:
        tracing.shutdown()
    client.connection_lost(None)
    if client.task is not None:
        await asyncio.sleep(0)  # let the connection's task see the close and end
    return best, calls


def label(args: argparse.Namespace) -> str:
    text = ("JSON POST (not JSON-RPC)" if args.json_post else "GET") + ", " + args.algorithm
    text += (" + sticky" if args.sticky else "") + (" (X-Session-Id)" if args.session else "")
    text += f", tracing {args.tracing:g}" if args.tracing is not None else ""
    text += ", access log" if args.access_log else ""
    return text


async def main(args: argparse.Namespace) -> None:
    if not args.rounds:
        best, calls = await measure(args, args.a2a)
        print(f"{label(args)}{'' if args.a2a else ', A2A off'}: {best * 1e6:.1f} us of Python per request "
              f"(best of 5 x {args.requests})")
        print(f"{calls:.0f} Python function calls per request")
        return
    results: dict[bool, list[float]] = {True: [], False: []}
    calls: dict[bool, float] = {}
    for round_ in range(args.rounds):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for a2a in order:
            best, calls[a2a] = await measure(args, a2a)
            results[a2a].append(best * 1e6)
        print(f"round {round_ + 1}: A2A on {results[True][-1]:.2f} us, off {results[False][-1]:.2f} us", flush=True)
    print(f"{label(args)}, best of 5 x {args.requests} per round, {args.rounds} rounds:")
    for a2a in (True, False):
        values = results[a2a]
        print(f"  A2A {'on ' if a2a else 'off'}: median {statistics.median(values):.2f} us/request, "
              f"range {min(values):.2f}-{max(values):.2f}, {calls[a2a]:.0f} Python calls/request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithm", default="weighted_random")
    parser.add_argument("--no-sticky", dest="sticky", action="store_false")
    parser.add_argument("--session", action="store_true", help="every request carries X-Session-Id: bench")
    parser.add_argument("--access-log", action="store_true", help="proxy.access_log on (to a NullHandler)")
    parser.add_argument("--tracing", type=float, help="tracing on with this sample ratio")
    parser.add_argument("--no-a2a", dest="a2a", action="store_false", help="the relay without A2A routing")
    parser.add_argument("--json-post", action="store_true", help="a JSON POST that is not a JSON-RPC call")
    parser.add_argument("--rounds", type=int, default=0, help="A2A on and off, alternating, this many rounds")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true")
    import uvloop  # what the daemon runs on (``loop: uvloop``)

    arguments = parser.parse_args()
    if arguments.access_log:
        import logging

        logging.getLogger("sidecar.access").addHandler(logging.NullHandler())
        logging.getLogger("sidecar.access").setLevel(logging.INFO)
        logging.getLogger("sidecar.access").propagate = False
    arguments.endpoint = ""
    sink = None
    if arguments.tracing is not None:  # spans go to bench/proxy/otlp_sink.py, in a process of its own
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        sink = subprocess.Popen([sys.executable, str(Path(__file__).parent / "otlp_sink.py"), "--port", str(port)])
        arguments.endpoint = f"http://127.0.0.1:{port}/v1/traces"
    try:
        uvloop.run(main(arguments))
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait()
