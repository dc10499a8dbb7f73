"""``sidecar dev``: a private etcd, the sidecar on its default listeners, and demo agents."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass

from aiohttp import web

from .cards import WELL_KNOWN, decode_card, merge_card
from .config import HostPort, Settings, build
from .demo_a2a import DemoA2AAgent
from .errors import SidecarError
from .model import parse_agent
from .registry.lease import LeaseKeeper, Registration
from .server import Server


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free right now on ``host``."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as source:
            low, high = (int(part) for part in source.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def stable_port(host: str = "127.0.0.1") -> int:
    """A free port outside the kernel's ephemeral range, for a server that stops and starts again on it.

    A port from ``free_port`` can be taken while its server is down: as the source port of any
    outgoing connection, or by a client's own retries to it (a TCP self-connect on loopback). The
    restarted server then cannot bind. Ports below the ephemeral range are never handed out that way.
    """
    low, high = _ephemeral_range()
    first, last = (10000, low - 1) if low > 11000 else (high + 1, 65535)
    for _ in range(200):
        port = random.randint(first, last)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    return free_port(host)


class EmbeddedEtcd:
    """One single-member etcd in a temporary directory on free loopback ports (stopped by PID)."""

    def __init__(self, name: str = "sidecar-dev") -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise SidecarError(
                "no `etcd` on PATH. Install it (Debian/Ubuntu: sudo apt-get install etcd-server etcd-client) "
                "or run your own and use `sidecar run --etcd-endpoints URL`.")
        self.binary = binary
        self.name = name
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # tmpfs: fsyncs cost nothing
        self.dir = tempfile.mkdtemp(prefix=f"{name}-", dir=base)
        self.client_port = stable_port()
        self.peer_port = stable_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd and wait until /health says true."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(os.path.join(self.dir, "etcd.log"), "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "--name", self.name, "--data-dir", os.path.join(self.dir, "data"),
                 "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"{self.name}={peer}", "--log-level", "warn", "--logger", "zap"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SidecarError(f"etcd exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as response:
                    if b'"true"' in response.read():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise SidecarError(f"etcd did not become healthy within {timeout:g}s; see {self.dir}/etcd.log")

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of this member's log (what a failed start said)."""
        try:
            with open(os.path.join(self.dir, "etcd.log"), "rb") as log:
                return b" | ".join(log.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError as error:
            return f"no log ({error})"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen member cannot handle SIGTERM
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class DemoAgent:
    id: str
    name: str
    capabilities: tuple[str, ...]
    tags: tuple[str, ...]
    zone: str = "dev-a"


DEMO_AGENTS = (
    DemoAgent("chat-1", "chat-agent", ("chat",), ("gpu", "fast")),
    DemoAgent("chat-2", "chat-agent", ("chat",), ("cpu",), zone="dev-b"),
    DemoAgent("summarizer-1", "summarizer", ("summarize", "translate"), ("batch",)),
)
# The A2A agent (built with the official SDK, sidecar/demo_a2a.py); its card gives its name and capability.
A2A_DEMO_ID = "research-1"


def demo_app(agent: DemoAgent) -> web.Application:
    """A tiny HTTP agent: echoes who answered, has /health and an SSE /stream."""

    async def hello(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({
            "agent": agent.id, "capabilities": list(agent.capabilities), "method": request.method,
            "path": request.path_qs, "received_bytes": len(body),
            "forwarded_for": request.headers.get("X-Forwarded-For", ""),
        })

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for n in range(5):
                await response.write(f"data: {json.dumps({'agent': agent.id, 'token': n})}\n\n".encode())
                await asyncio.sleep(0.2)
        except ConnectionResetError:
            pass  # the client went away mid-stream: nothing to report
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/stream", stream)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


async def dev(stop: asyncio.Event, loop_name: str = "uvloop") -> int:
    """Run the embedded development setup until ``stop`` is set; clean up everything."""
    etcd = EmbeddedEtcd()
    runners: list[web.AppRunner] = []
    a2a_agent = DemoA2AAgent(A2A_DEMO_ID)
    server: Server | None = None
    try:
        await asyncio.to_thread(etcd.start)
        settings = build(Settings, {"etcd": {"endpoints": [etcd.endpoint]}, "loop": loop_name,
                                    "agent": {"zone": "dev-a"}})
        server = Server(settings)
        await server.start()
        for demo in DEMO_AGENTS:
            runner = web.AppRunner(demo_app(demo), access_log=None, handle_signals=False)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
            await server.leases.register(parse_agent({
                "id": demo.id, "name": demo.name, "address": "127.0.0.1", "port": port,
                "capabilities": list(demo.capabilities), "tags": list(demo.tags), "zone": demo.zone,
                "version": "dev", "metadata": {"demo": "true"},
                "health": {"type": "http", "url": f"http://127.0.0.1:{port}/health", "status": "healthy"},
            }))
        await a2a_agent.start()
        await register_a2a_demo(server.leases, a2a_agent)
        # Print "what to try" only once this sidecar's own snapshot serves the demo agents (and the card).
        deadline = asyncio.get_running_loop().time() + 10
        while not (all(d.id in server.catalog.snapshot.by_id for d in DEMO_AGENTS)
                   and server.cards.of(a2a_agent.name, A2A_DEMO_ID) is not None):
            if asyncio.get_running_loop().time() > deadline:
                raise SidecarError("the demo agents did not reach the snapshot within 10 s")
            await asyncio.sleep(0.01)
        print(_banner(settings, etcd.endpoint), flush=True)
        await stop.wait()
        print("\nsidecar dev: shutting down", flush=True)
        return 0
    finally:
        if server is not None:
            await server.stop()
        for runner in runners:
            await runner.cleanup()
        await a2a_agent.stop()
        await asyncio.to_thread(etcd.cleanup)


async def register_a2a_demo(leases: LeaseKeeper, agent: DemoA2AAgent, zone: str = "dev-a") -> Registration:
    """Register a started SDK agent as a card-reading sidecar would: fields from its card, the card on its lease."""
    card = decode_card(agent.card_bytes, agent.url + WELL_KNOWN[0])
    fields = merge_card({
        "id": agent.replica, "address": agent.host, "port": agent.port, "zone": zone,
        "metadata": {"demo": "true"},
        "health": {"type": "http", "url": agent.url + WELL_KNOWN[0], "status": "healthy"},
    }, card, explicit=("port",))
    registration = await leases.register(parse_agent(fields))
    await registration.attach_card(card.raw)
    return registration


def _banner(settings: Settings, etcd_endpoint: str) -> str:
    dns_host, dns_port = HostPort.parse(settings.dns.listen)
    proxy = settings.proxy.listen
    admin = settings.admin.listen
    agents = ", ".join(f"{d.id} ({'/'.join(d.capabilities)})" for d in DEMO_AGENTS)
    send = ('{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":{"message":'
            '{"role":"ROLE_USER","messageId":"m1","parts":[{"text":"ping"}]}}}')
    stream = ('{"jsonrpc":"2.0","id":2,"method":"message/stream","params":{"message":'
              '{"kind":"message","role":"user","messageId":"m2","parts":[{"kind":"text","text":"what is etcd?"}]}}}')
    return f"""
sidecar dev is running (Ctrl-C stops everything and removes the temporary etcd).

  etcd      {etcd_endpoint}   (private, in a temp dir)
  admin     http://{admin}
  proxy     http://{proxy}
  dns       {settings.dns.listen} (UDP and TCP)
  grpc      {settings.grpc.listen} (sidecar.v1.Discovery, health, reflection)
  agents    {agents}
  a2a       {A2A_DEMO_ID} (research), an A2A agent built with the official SDK (a2a-sdk)

Try:
  curl -s http://{admin}/v1/agents | python3 -m json.tool
  dig @{dns_host} -p {dns_port} chat.agents.local SRV
  dig @{dns_host} -p {dns_port} gpu.chat.agents.local A
  dig @{dns_host} -p {dns_port} summarizer-1.id.agents.local TXT
  curl -s -H 'Host: chat.agents.local' http://{proxy}/hello
  curl -s -x http://{proxy} http://summarize.agents.local/v1/run
  curl -sN -x http://{proxy} http://chat.agents.local/stream
  curl -s -x http://{proxy} http://research.agents.local/.well-known/agent-card.json
  curl -s -x http://{proxy} http://research.agents.local/ -H 'A2A-Version: 1.0' -H 'Content-Type: application/json' \\
       -d '{send}'
  curl -sN -x http://{proxy} http://research.agents.local/ -H 'Content-Type: application/json' \\
       -d '{stream}'
  curl -s http://{admin}/v1/cards | python3 -m json.tool
  ETCD_ENDPOINTS={etcd_endpoint} sidecar agents
  printf 'load_balancer: {{algorithm: round_robin}}\\n' | ETCD_ENDPOINTS={etcd_endpoint} sidecar config set -
  curl -sN http://{admin}/v1/watch
  ETCD_ENDPOINTS={etcd_endpoint} sidecar register --name my-agent --address 127.0.0.1 --port 9000 --capability code
"""
