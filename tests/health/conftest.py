"""Real agents for the health tests: an HTTP agent whose health answer a test sets,
with an optional A2A card, and helpers to run ``sidecar run`` as a process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import dns.asyncquery
import dns.message
import pytest_asyncio
from aiohttp import web

from sidecar.server import Server


class HttpAgent:
    """An aiohttp app on 127.0.0.1: ``/health`` answers ``status``; the card paths serve ``cards``."""

    def __init__(self) -> None:
        self.status = 200
        self.load = ""  # sent as x-agent-load when set
        self.cards: dict[str, Any] = {}  # path -> JSON object, or bytes served as is
        self.checks = 0
        # (path, If-None-Match sent, status answered) of every card request.
        self.card_requests: list[tuple[str, str, int]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _health(self, request: web.Request) -> web.Response:
        self.checks += 1
        headers = {"x-agent-load": self.load} if self.load else {}
        return web.Response(status=self.status, text="ok" if self.status < 300 else "not ok", headers=headers)

    async def _card(self, request: web.Request) -> web.Response:
        card = self.cards.get(request.path)
        asked = request.headers.get("If-None-Match", "")
        if card is None:
            self.card_requests.append((request.path, asked, 404))
            raise web.HTTPNotFound()
        body = card if isinstance(card, bytes) else json.dumps(card).encode()
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        status = 304 if asked == etag else 200
        self.card_requests.append((request.path, asked, status))
        if status == 304:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=body, content_type="application/json", headers={"ETag": etag})

    async def start(self, port: int = 0) -> HttpAgent:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/.well-known/{card}", self._card)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest_asyncio.fixture
async def http_agent() -> AsyncIterator[HttpAgent]:
    agent = await HttpAgent().start()
    yield agent
    await agent.stop()


async def answers(server: Server, name: str) -> list[str]:
    """The A records a sidecar's DNS gives for ``name`` (dnspython over UDP)."""
    query = dns.message.make_query(name, "A")
    response = await dns.asyncquery.udp(query, "127.0.0.1", port=server.dns.port, timeout=5)
    return sorted(rr.to_text() for rrset in response.answer for rr in rrset)


class SidecarProcess:
    """``python -m sidecar run ...`` as a child process we stop ourselves, by PID."""

    def __init__(self, args: list[str], log_path: str) -> None:
        self.args = args
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SidecarProcess:
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("POD_IP", None)
        self.process = subprocess.Popen([sys.executable, "-m", "sidecar", "run", *self.args], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def returncode(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
