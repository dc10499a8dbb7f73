"""The callback driver of the exchange state machine (exchange.py): a ``Flight`` is one
request's I/O side (client, request, upstream head, the task's waiter) around its
``Machine``. From the moment its request is sent, the upstream connection's callbacks
call ``landed`` (response head), ``arrived`` (response end), ``crashed`` (no head) and
``broken`` (a bug); each feeds its event to the machine, carries out the action, and
ends in ``proceed``, which wakes the connection's task when it waits in ``Relay.fly``
and otherwise (the fast path, begun by ``Relay.begin`` on a pooled connection) finishes
the request itself or hands what needs waiting to the task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import typing

from ..errors import ProxyError
from . import tunnel
from .a2a import Call
from .client import ClientConnection, Request
from .exchange import ABORT, ANSWER, DONE, GONE, POOL, RETRY, UPGRADE, Machine
from .upstream import Exchange

if typing.TYPE_CHECKING:
    from .relay import Relay

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client hung up while its request was being served."""


class Flight:
    """One request forwarded to agents: the machine, and the connections it acts on."""

    __slots__ = ("call", "client", "head", "m", "relay", "request", "upgrading", "waiter")

    def __init__(self, relay: Relay, client: ClientConnection, request: Request, machine: Machine,
                 head: bytes) -> None:
        self.relay = relay
        self.client = client
        self.request = request
        self.m = machine
        self.head = head  # the upstream request head (a traced attempt rewrites its traceparent)
        self.call: Call | None = None  # an A2A call: its answer is read for task and context owners
        self.upgrading: Exchange | None = None  # the exchange an UPGRADE turns into a tunnel
        # Set while the connection's task waits in ``Relay.fly`` for the step the callbacks are taking.
        self.waiter: asyncio.Future[int] | None = None

    def proceed(self, action: int) -> None:
        """End a callback's step (DONE, RETRY, UPGRADE, ANSWER, GONE): wake the task waiting in
        ``Relay.fly``, or (fast path) finish here."""
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(action)
            return
        relay, client, request, m = self.relay, self.client, self.request, self.m
        if action == DONE:
            client.done(request, m.keep)
        elif action == RETRY:
            client.hand_off(m.route.kind, functools.partial(relay.fly, self))
        elif action == UPGRADE:
            client.hand_off(m.route.kind, self.upgrade)
        else:
            m.release()
            error = m.error
            if action == ANSWER and error is not None:
                client.done(request, relay.answer(client, request, m.route.kind, error))
            else:
                client.done(request, False)

    def noted(self, action: int, status: int) -> None:
        """After an attempt was accounted: its trace span ends, a success batch gets its fold."""
        m = self.m
        if m.fold:
            m.fold = False
            relay = self.relay
            relay.loop.call_soon(relay.policy.fold)
        trace = self.request.trace
        if trace is not None and m.reported:
            trace.end_attempt(m.reported, status, action == RETRY)
        m.reported = ""

    # -- the upstream callbacks

    def landed(self, exchange: Exchange) -> None:
        """The response head (and what came with it) arrived: relay it, or try elsewhere."""
        m = self.m
        request = self.request
        status = exchange.status
        action = m.head(status, exchange.headers, exchange.upgraded is not None,
                        request.replayable and request.body_done, exchange.loop.time())
        self.noted(action, status)
        if action == RETRY:
            # Another agent may do better; with nobody else to ask, this answer goes to the client.
            self.discard(exchange)
            self.proceed(RETRY)
            return
        if action == UPGRADE:
            exchange.flight = None
            self.upgrading = exchange
            self.proceed(UPGRADE)
            return
        self.commit(exchange)
        if exchange.failure is not None:
            exchange._wake()

    def commit(self, exchange: Exchange) -> None:
        """Send the response head (and what came of the body) to the client."""
        relay, choice, request = self.relay, self.m.choice, self.request
        agent_id = choice.agent.id if choice is not None else ""
        head, frame_chunked, self.m.keep = relay.response_head(
            request, exchange, agent_id, choice.set_cookie if choice is not None else None, request.keep_alive)
        if request.trace is not None:
            request.trace.answered(exchange.status, "ok", agent_id)
        if relay.a2a is not None:
            relay.a2a_commit(self, exchange, agent_id)
        exchange.commit(head, frame_chunked)

    def arrived(self, exchange: Exchange) -> None:
        """The response ended (complete, or cut short): pool or close both sides."""
        request = self.request
        action = self.m.ended(exchange.failure is not None, exchange.keep_alive, exchange.no_body,
                              request.body_done)
        request.detach()
        self.client.upstream = None
        conn = exchange.conn
        if action == POOL:
            self.relay.pool.release(conn)
        else:
            exchange.stop_timer()
            conn.exchange = None
            conn.close()
            if action == ABORT:
                self.client.abort()
        self.proceed(DONE)

    def crashed(self, exchange: Exchange, error: ProxyError) -> None:
        """The attempt failed before a response head: retry, or answer the error."""
        self.discard(exchange)
        request = self.request
        action = self.m.attempt_failed(error, request.replayable and request.body_done, self.client.closed,
                                       exchange.loop.time())
        self.noted(action, 0)
        self.proceed(action)

    def discard(self, exchange: Exchange) -> None:
        """Let go of an attempt: its connection is closed, its response goes nowhere."""
        self.request.detach()
        self.client.upstream = None
        exchange.stop_timer()
        exchange.flight = None
        exchange.conn.exchange = None
        exchange.conn.close()

    def broken(self, exchange: Exchange) -> None:
        """A bug in a callback, not a peer's doing: log it and cut both connections."""
        log.exception("proxy request from %s failed", self.client.peer.decode())
        exchange.flight = None
        exchange.stop_timer()
        exchange.conn.exchange = None
        exchange.conn.close()
        self.client.abort()
        self.m.release()
        self.proceed(GONE)

    async def upgrade(self) -> bool:
        """Relay an Upgrade's ``101`` and turn both connections into a tunnel."""
        exchange = self.upgrading
        assert exchange is not None
        self.upgrading = None
        try:
            self.commit(exchange)
            exchange.stop_timer()
            assert exchange.upgraded is not None
            return await tunnel.tunnel(self.relay, self.client, exchange.conn, exchange.upgraded)
        finally:
            self.m.tunnel_over()
