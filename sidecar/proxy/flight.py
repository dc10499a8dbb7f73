"""One request forwarded to agents (or a passthrough host), across its attempts: the
forwarding state machine. From the moment its request is sent, a Flight is driven by
the upstream connection's callbacks (``landed``, ``arrived``, ``crashed``); each ends
its step in ``proceed``, which wakes the connection's task when it waits in
``Relay.fly`` and otherwise (the fast path, begun by ``Relay.begin`` on a pooled
connection) finishes the request itself or hands what needs waiting to the task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import typing

from ..errors import ProxyError
from . import routing, tunnel
from .a2a import Call
from .client import ClientConnection, Request
from .heads import Keys
from .load import OutcomeKind
from .policy import Choice
from .upstream import Exchange

if typing.TYPE_CHECKING:
    from .relay import Relay

log = logging.getLogger(__name__)

# How a callback ends a Flight's step (``Flight.proceed``).
DONE, RETRY, UPGRADE, ERROR, GONE = "done", "retry", "upgrade", "error", "gone"


class ClientGone(Exception):
    """The client hung up while its request was being served."""


class AttemptFailed(Exception):
    """One upstream attempt failed before a usable response head."""

    def __init__(self, kind: OutcomeKind, sent: bool, error: ProxyError) -> None:
        super().__init__(str(error))
        self.kind = kind
        self.sent = sent
        self.error = error


class Flight:
    """One request forwarded to agents, across its attempts."""

    __slots__ = ("attempt_started", "call", "choice", "client", "head", "keep", "keys", "last_agent", "last_error",
                 "pinned", "relay", "released", "request", "route", "started", "tried", "waiter")

    def __init__(self, relay: Relay, client: ClientConnection, request: Request, route: routing.Route, head: bytes,
                 keys: Keys, started: float) -> None:
        self.relay = relay
        self.client = client
        self.request = request
        self.route = route
        self.head = head
        self.keys = keys
        self.started = started
        self.tried: list[str] = []
        self.choice: Choice | None = None
        self.attempt_started = started
        self.last_error: ProxyError | None = None
        self.last_agent = ""
        self.keep = True  # keep the client connection after this response
        self.released = False  # the target's concurrency slot is given back
        self.call: Call | None = None  # an A2A call: its answer is read for task and context owners
        self.pinned: str | None = None  # the agent holding the call's task or context: it or nobody
        # Set while the connection's task waits in ``Relay.fly`` for the step the callbacks are taking.
        self.waiter: asyncio.Future[tuple[str, object]] | None = None

    def proceed(self, step: str, value: object = None) -> None:
        """End a callback's step: wake the task waiting in ``Relay.fly``, or (fast path) finish here."""
        relay = self.relay
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result((step, value))
            return
        client, request, kind = self.client, self.request, self.route.kind
        if step is DONE:
            client.done(request, bool(value))
        elif step is RETRY:
            client.hand_off(kind, functools.partial(relay.fly, self))
        elif step is UPGRADE:
            assert isinstance(value, Exchange)
            client.hand_off(kind, functools.partial(self.upgrade, value))
        else:
            relay.release(self)
            if isinstance(value, ProxyError):
                client.done(request, relay.answer(client, request, kind, value))
            else:
                client.done(request, False)

    def landed(self, exchange: Exchange) -> None:
        """The response head (and what came with it) arrived: relay it, or try elsewhere."""
        choice = self.choice
        if choice is not None and self.relay.judge(self, choice, exchange):
            self.proceed(RETRY)
            return
        if exchange.upgraded is not None:
            exchange.flight = None
            self.proceed(UPGRADE, exchange)
            return
        self.keep = self._commit(exchange)
        if exchange.failure is not None:
            exchange._wake()

    def _commit(self, exchange: Exchange) -> bool:
        """Send the response head (and what came of the body) to the client; whether it may be reused."""
        relay, choice, request = self.relay, self.choice, self.request
        agent_id = choice.agent.id if choice is not None else ""
        head, frame_chunked, keep = relay.response_head(request, exchange, agent_id,
                                                        choice.set_cookie if choice is not None else None,
                                                        request.keep_alive)
        relay.relayed(request, exchange, self.route.kind, agent_id, self.started)
        if relay.a2a is not None:
            relay.a2a_commit(self, exchange, agent_id)
        exchange.commit(head, frame_chunked)
        return keep

    def arrived(self, exchange: Exchange) -> None:
        """The response ended (complete, or cut short): pool or close both sides."""
        relay = self.relay
        if self.choice is not None:
            relay.policy.finish(self.choice)
        relay.release(self)
        self.proceed(DONE, relay.settle(self.client, self.request, exchange) and self.keep)

    def crashed(self, exchange: Exchange, error: ProxyError) -> None:
        """The attempt failed before a response head: retry, or answer the error."""
        relay = self.relay
        choice = self.choice
        failed = relay.attempt_failed(self.client, self.request, exchange, error)
        if choice is None:
            error.target = self.route.host
            self.proceed(ERROR, error)
            return
        try:
            relay.failed(self, choice, failed)
        except ClientGone:
            self.proceed(GONE)
            return
        except ProxyError as err:
            self.proceed(ERROR, err)
            return
        self.proceed(RETRY)

    def broken(self, exchange: Exchange) -> None:
        """A bug in a callback, not a peer's doing: log it and cut both connections."""
        relay = self.relay
        log.exception("proxy request from %s failed", self.client.peer.decode())
        exchange.flight = None
        exchange.stop_timer()
        exchange.conn.exchange = None
        exchange.conn.close()
        self.client.abort()
        relay.release(self)
        self.proceed(GONE)

    async def upgrade(self, exchange: Exchange) -> bool:
        """Relay an Upgrade's ``101`` and turn both connections into a tunnel."""
        relay = self.relay
        choice = self.choice
        try:
            self._commit(exchange)
            exchange.stop_timer()
            assert exchange.upgraded is not None
            return await tunnel.tunnel(relay, self.client, exchange.conn, exchange.upgraded)
        finally:
            if choice is not None:
                relay.policy.finish(choice)
            relay.release(self)
