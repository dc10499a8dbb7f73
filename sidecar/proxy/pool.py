"""Idle keep-alive upstream connections per (address, port), newest first."""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Callable

from .upstream import Upstream

if typing.TYPE_CHECKING:
    from .relay import Relay

MAX_IDLE_PER_AGENT = 128
# Pooled connections older than this are not reused: below the 5 s keep-alive of
# uvicorn and Node, so the agent rarely closes one under a request we just sent.
UPSTREAM_IDLE = 4.0


class Pool:
    """Idle keep-alive upstream connections per (address, port), newest first."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._idle: dict[tuple[str, int], list[Upstream]] = {}

    def take(self, address: str, port: int) -> Upstream | None:
        """A fresh pooled connection to address:port, or None."""
        idle = self._idle.get((address, port))
        if idle:
            horizon = self.relay.loop.time() - min(self.relay.settings.idle_timeout, UPSTREAM_IDLE)
            while idle:
                conn = idle.pop()
                if not conn.closed and conn.idle_since > horizon:
                    conn.reused = True
                    self.relay.metrics.pool_reuses += 1
                    return conn
                conn.close()
        return None

    async def connect(self, address: str, port: int, connect_timeout: float, tunnel: bool = False) -> Upstream:
        """A new connection to address:port (``take`` first for a pooled one); a raw one for a tunnel.

        Raises TimeoutError or OSError when connecting fails.
        """
        relay, key = self.relay, (address, port)
        # Upstream is an asyncio protocol by its methods, not its base class (see ClientConnection).
        factory = typing.cast("Callable[[], asyncio.BaseProtocol]", lambda: Upstream(relay, key, tunnel))
        async with asyncio.timeout(connect_timeout):
            _, conn = await relay.loop.create_connection(factory, address, port)
        relay.metrics.upstream_connections += 1
        return typing.cast(Upstream, conn)

    def release(self, conn: Upstream) -> None:
        """Return a connection whose last response completed and that may be reused."""
        conn.exchange = None
        conn.client = None
        conn.resume_reading()
        if conn.closed:
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_AGENT:
            conn.close()
            return
        conn.idle_since = self.relay.loop.time()
        idle.append(conn)

    def forget(self, conn: Upstream) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in list(idle):
                conn.close()
        self._idle.clear()


