"""Raw TCP tunnels: CONNECT, and connections upgraded (WebSocket) after their response head."""

from __future__ import annotations

import typing

from ..errors import BadRequest, PassthroughDisabled, ProxyError, UpstreamError, UpstreamTimeout
from . import routing
from .heads import Keys
from .load import OutcomeKind
from .upstream import Upstream

if typing.TYPE_CHECKING:
    from .client import ClientConnection
    from .relay import Relay


async def tunnel(relay: Relay, client: ClientConnection, conn: Upstream, upstream_early: bytes) -> bool:
    """Relay raw bytes both ways until either side closes, or no byte has passed either way for
    ``proxy.stream_idle_timeout`` (the client connection's idle timer then closes both)."""
    conn.exchange = None
    conn.tunnel = True
    conn.client = client
    client.upstream = conn
    client.watch_tunnel()
    if upstream_early:
        client.write(upstream_early)
    for chunk in client.raw_buffer or ():
        conn.write_raw(chunk)
    client.raw_buffer = []
    client.resume_reading("error")
    relay.metrics.tunnels += 1
    try:
        while not client.closed and not conn.closed:
            client.waiter = relay.loop.create_future()
            await client.waiter
    finally:
        relay.metrics.tunnels -= 1
        conn.close()
    return False


async def connect(relay: Relay, client: ClientConnection, authority: str) -> bool:
    """Serve ``CONNECT authority``: a TCP tunnel to a picked agent (in-zone) or to the host (passthrough)."""
    try:
        route = routing.route(authority, relay.zone, default_port=443)
    except ValueError as exc:
        raise BadRequest(authority, str(exc)) from None
    agent_id = ""
    choice = None
    if route.kind == "external":
        if not relay.settings.passthrough:
            raise PassthroughDisabled(route.host, f"{route.host} is outside {relay.zone} and passthrough is off")
        address, port = route.host, route.port
    else:
        choice = relay.policy.choose(route, relay.catalog.snapshot, Keys())
        agent_id, address, port = choice.agent.id, choice.agent.address, choice.agent.port
    started = relay.loop.time()
    try:
        conn = await relay.pool.connect(address, port, relay.settings.connect_timeout, tunnel=True)
    except (TimeoutError, OSError) as exc:
        timed_out = isinstance(exc, TimeoutError)
        if choice is not None:
            kind = OutcomeKind.TIMEOUT if timed_out else OutcomeKind.CONNECT_ERROR
            relay.policy.report(choice, kind, relay.loop.time() - started)
        err: ProxyError
        if timed_out:
            err = UpstreamTimeout(route.host, f"connecting to {address}:{port} timed out")
        else:
            err = UpstreamError(route.host, f"cannot connect to {address}:{port}: {exc.strerror or exc}")
        err.agent_id = agent_id
        raise err from None
    if choice is not None and relay.policy.report(choice, OutcomeKind.SUCCESS, relay.loop.time() - started):
        relay.loop.call_soon(relay.policy.fold)
    head = b"HTTP/1.1 200 Connection Established\r\n"
    if agent_id:
        head += b"x-sidecar-agent: " + agent_id.encode() + b"\r\n"
    client.write(head + b"\r\n")
    relay.count("connect", "ok")
    if client.active is not None and client.active.trace is not None:
        client.active.trace.answered(200, "ok", agent_id)
    return await tunnel(relay, client, conn, b"")

