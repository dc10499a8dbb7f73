"""The parts a chaos scenario runs: `sidecar run` processes, stand-in agent backends, the admin client.

A sidecar is a child process (its own event loop and GIL, as in production),
started from a YAML file and waited on through /readyz; it is stopped by its PID.
A command prefix (``ip netns exec NS``, ``taskset -c 0``) wraps it when a scenario
needs one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import aiohttp
import yaml

from ..etcd_process import free_port


class SidecarProcess:
    """One `sidecar run` child on free ports of ``host``."""

    def __init__(self, endpoints: Sequence[str], prefix: str, *, host: str = "127.0.0.1",
                 wrap: Sequence[str] = (), request_timeout: float = 5.0, **sections: dict[str, Any]) -> None:
        self.host = host
        self.admin_port, self.dns_port, self.proxy_port = free_port(), free_port(), free_port()
        document: dict[str, Any] = {
            # Members are learnt every second (the default is 30 s) so membership changes are followed in time.
            "etcd": {"endpoints": list(endpoints), "prefix": prefix, "request_timeout": request_timeout,
                     "dial_timeout": 2, "auto_sync_interval": 1},
            "admin": {"listen": f"{host}:{self.admin_port}"},
            "dns": {"listen": f"{host}:{self.dns_port}", "upstreams": ["none"]},
            "proxy": {"listen": f"{host}:{self.proxy_port}"},
            "grpc": {"listen": f"{host}:{free_port()}"},
            "log_level": "warning",
        }
        for name, section in sections.items():
            document[name] = {**document.get(name, {}), **section}
        handle, self.config = tempfile.mkstemp(prefix="chaos-sidecar-", suffix=".yaml")
        with os.fdopen(handle, "w") as out:
            yaml.safe_dump(document, out)
        self.log = self.config[:-5] + ".log"
        self.wrap = list(wrap)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def admin(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            command = [*self.wrap, sys.executable, "-m", "sidecar", "run", "--config", self.config]
            self.process = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 60, probe: Sequence[str] = ()) -> None:
        """Until /readyz says 200 (through ``probe``, e.g. ``ip netns exec NS``, when the sidecar is elsewhere)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise AssertionError(f"sidecar exited: {self.tail()}")
            if probe:
                result = subprocess.run([*probe, "curl", "-sf", "-o", "/dev/null", f"{self.admin}/readyz"],
                                        capture_output=True, timeout=10)
                if result.returncode == 0:
                    return
            else:
                try:
                    with urllib.request.urlopen(f"{self.admin}/readyz", timeout=1) as response:
                        if response.status == 200:
                            return
                except OSError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"sidecar not ready within {timeout:g}s: {self.tail()}")

    def metric(self, name: str) -> float:
        """The sum of a metric's samples on /metrics (0 when absent)."""
        with urllib.request.urlopen(self.admin + "/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    def loop_lags(self, over: float = 0.1) -> tuple[int, str]:
        """From sidecar_event_loop_lag_seconds: probes later than ``over`` s, and the bucket of the worst."""
        with urllib.request.urlopen(self.admin + "/metrics", timeout=5) as response:
            text = response.read().decode()
        buckets = {}
        for line in text.splitlines():
            if line.startswith("sidecar_event_loop_lag_seconds_bucket{"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
        if not buckets:
            return 0, "none"
        total = buckets[float("inf")]
        late = int(total - max((c for b, c in buckets.items() if b <= over), default=0))
        bounds = sorted(buckets)
        worst = next(b for b in bounds if buckets[b] == total)
        below = max((b for b in bounds if b < worst), default=0.0)
        return late, f"{below:g}-{worst:g} s"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            with open(self.log, errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(20)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        for path in (self.config, self.log):
            try:
                os.unlink(path)
            except OSError:
                pass


class Backend:
    """A stand-in agent on a loopback port: ``ok`` answers 200, ``hang`` accepts and never answers,
    ``reset`` accepts and resets the connection."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.port = 0
        self.served = 0
        self._server: asyncio.base_events.Server | None = None
        self._hung: list[asyncio.StreamWriter] = []

    async def start(self) -> Backend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()
            return
        if self.mode == "hang":
            self._hung.append(writer)
            return
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                self.served += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for writer in self._hung:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def agent_body(agent_id: str, capability: str, port: int, ttl: str) -> dict[str, Any]:
    return {"id": agent_id, "name": f"{capability}-agent", "address": "127.0.0.1", "port": port,
            "capabilities": [capability], "ttl": ttl}


async def register(http: aiohttp.ClientSession, admin: str, body: dict[str, Any],
                   timeout: float = 30) -> tuple[int, str]:
    """POST /v1/agents; (status, body text), or (0, the error) when no answer came."""
    try:
        async with http.post(admin + "/v1/agents", json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.text()
    except (TimeoutError, aiohttp.ClientError) as exc:
        return 0, repr(exc)


async def deregister(http: aiohttp.ClientSession, admin: str, agent_id: str, timeout: float = 30) -> tuple[int, str]:
    try:
        async with http.delete(f"{admin}/v1/agents/{agent_id}", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.text()
    except (TimeoutError, aiohttp.ClientError) as exc:
        return 0, repr(exc)


async def agent_ids(http: aiohttp.ClientSession, admin: str, capability: str) -> set[str]:
    async with http.get(f"{admin}/v1/agents", params={"capability": capability},
                        timeout=aiohttp.ClientTimeout(total=5)) as response:
        document = json.loads(await response.text())
    return {agent["id"] for agent in document["agents"]}
