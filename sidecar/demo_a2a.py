"""A demo A2A agent built with the official SDK (a2a-sdk), for ``sidecar dev`` and the interop tests.

One process can run several replicas on loopback ports; each keeps its tasks in
memory, so a task created on one replica is unknown to the others (what task
affinity in the proxy is for). Every answer says which replica gave it: the
replica id is in the text and in ``metadata.replica`` of messages, artifacts and
status updates. What a message's text asks for:

- ``ping``: one Message back, no task.
- ``slow``: a task that stays ``working`` until cancelled or ``slow_seconds``
  pass (then completed), for ``tasks/get`` polling and ``tasks/cancel``; send it
  with ``configuration.returnImmediately`` (v0.3: ``blocking: false``) or as a stream.
- anything else: a task that emits ``chunks`` artifact updates ``chunk_delay``
  apart, then completes (a blocking send returns the completed task).

The card is v1.0 (the SDK also fills in the v0.3 fields), its one skill is the
capability, its interface URL is the replica's own address, and it carries an
HS256 signature so that a proxy that rewrites it can be seen to drop it. The
JSON-RPC endpoint at ``/`` accepts the v1.0 method names (``SendMessage``...,
with an ``A2A-Version: 1.0`` header) and the v0.3 ones (``message/send``...).
This module is the only importer of the SDK's server side, starlette and uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from a2a.helpers import new_task, new_text_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, TaskState
from a2a.utils.signing import create_agent_card_signer
from starlette.applications import Starlette

# A fixed, public HS256 key: the signature only has to exist (and verify in tests), it guards nothing.
DEMO_SIGNING_KEY = b"sidecar-demo-a2a-card-signing-key-not-a-secret"
DEMO_KEY_ID = "sidecar-demo"
_CONTEXTS_KEPT = 10_000


class ResearchExecutor(AgentExecutor):
    """The demo agent's behaviour (see the module docstring)."""

    def __init__(self, replica: str, *, chunks: int, chunk_delay: float, slow_seconds: float) -> None:
        self.replica = replica
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.slow_seconds = slow_seconds
        # Messages seen per context on this replica: a test can tell whether a context stayed here.
        self.turns: OrderedDict[str, int] = OrderedDict()

    def _turn(self, context_id: str) -> int:
        turn = self.turns.pop(context_id, 0) + 1
        self.turns[context_id] = turn
        if len(self.turns) > _CONTEXTS_KEPT:
            self.turns.popitem(last=False)
        return turn

    def _meta(self, turn: int | None = None) -> dict[str, object]:
        return {"replica": self.replica} if turn is None else {"replica": self.replica, "turn": turn}

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        text = context.get_user_input()
        task_id, context_id = str(context.task_id), str(context.context_id)
        turn = self._turn(context_id)
        if "ping" in text.lower() and context.current_task is None:
            reply = new_text_message(f"pong from {self.replica}", context_id=context_id)
            reply.metadata.update(self._meta(turn))
            await event_queue.enqueue_event(reply)
            return
        task = new_task(task_id, context_id, TaskState.TASK_STATE_SUBMITTED,
                        history=[context.message] if context.message else None)
        task.metadata.update(self._meta(turn))
        await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task_id, context_id)
        slow = "slow" in text.lower()
        await updater.update_status(
            TaskState.TASK_STATE_WORKING, metadata=self._meta(turn),
            message=updater.new_agent_message([new_text_part(
                f"{'slow task' if slow else 'researching'} on {self.replica}")]))
        if slow:
            await asyncio.sleep(self.slow_seconds)
        else:
            for n in range(self.chunks):
                await asyncio.sleep(self.chunk_delay)
                await updater.add_artifact([new_text_part(f"chunk {n} from {self.replica}: {text}")],
                                           artifact_id="answer", name="answer", append=n > 0,
                                           last_chunk=n == self.chunks - 1, metadata=self._meta(turn))
        await updater.update_status(
            TaskState.TASK_STATE_COMPLETED, metadata=self._meta(turn),
            message=updater.new_agent_message([new_text_part(f"done by {self.replica}")]))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        await updater.update_status(
            TaskState.TASK_STATE_CANCELED, metadata=self._meta(),
            message=updater.new_agent_message([new_text_part(f"cancelled by {self.replica}")]))


def demo_card(url: str, *, name: str, capability: str, replica: str, sign: bool = True) -> AgentCard:
    """The v1.0 card of a demo replica serving JSON-RPC at ``url`` (signed with the demo key)."""
    card = AgentCard(
        name=name, description=f"A2A SDK demo agent ({capability}), replica {replica}", version="1.0.0",
        # One endpoint speaks both versions; the 0.3 entry makes the SDK serve the v0.3 card fields too.
        supported_interfaces=[AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version=version)
                              for version in ("1.0", "0.3")],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"], default_output_modes=["text/plain"],
        skills=[AgentSkill(id=capability, name=capability, tags=["demo", "a2a"],
                           description=f"Answers {capability} questions (ping, slow, or anything else)",
                           examples=["ping", "what is etcd?", "slow"])],
    )
    if sign:
        card = create_agent_card_signer(DEMO_SIGNING_KEY, {"kid": DEMO_KEY_ID, "alg": "HS256", "jku": None,
                                                           "typ": "JOSE"})(card)
    return card


def card_json(card: AgentCard) -> bytes:
    """The card as its well-known URL serves it (v1.0 fields plus the SDK's v0.3 compatibility fields)."""
    return json.dumps(agent_card_to_dict(card), separators=(",", ":")).encode()


class _Server(uvicorn.Server):
    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the embedding process owns SIGINT and SIGTERM


class DemoA2AAgent:
    """One replica: the SDK's JSON-RPC server and card on a loopback port, run on the caller's loop."""

    def __init__(self, replica: str, *, name: str = "research-agent", capability: str = "research",
                 host: str = "127.0.0.1", port: int = 0, chunks: int = 3, chunk_delay: float = 0.1,
                 slow_seconds: float = 60.0) -> None:
        self.replica = replica
        self.name = name
        self.capability = capability
        self.host = host
        self._requested_port = port
        self.executor = ResearchExecutor(replica, chunks=chunks, chunk_delay=chunk_delay, slow_seconds=slow_seconds)
        self.port = 0
        self.card: AgentCard | None = None
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._serving: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The replica's base URL (also its card's interface URL)."""
        return f"http://{self.host}:{self.port}"

    @property
    def card_bytes(self) -> bytes:
        """The served card as JSON bytes (what the registry stores)."""
        if self.card is None:
            raise RuntimeError("the agent is not started")
        return card_json(self.card)

    async def start(self) -> None:
        """Bind (port 0: any free port), build the card with the bound address, start serving."""
        # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
        # and without it every response on a kept-alive connection waits out a delayed ACK (~40 ms).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        sock.setblocking(False)
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        self.card = demo_card(self.url + "/", name=self.name, capability=self.capability, replica=self.replica)
        handler = DefaultRequestHandler(agent_executor=self.executor, task_store=InMemoryTaskStore(),
                                        agent_card=self.card)

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            await handler.aclose()

        # The SDK serves the card at the v1.0 path only; older clients ask for the v0.2/v0.3 one.
        app = Starlette(routes=[*create_agent_card_routes(self.card),
                                *create_agent_card_routes(self.card, card_url="/.well-known/agent.json"),
                                *create_jsonrpc_routes(handler, "/", enable_v0_3_compat=True)],
                        lifespan=lifespan)
        config = uvicorn.Config(app, log_level="warning", access_log=False, ws="none", lifespan="on",
                                timeout_graceful_shutdown=1)
        server = self._server = _Server(config)
        self._serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]),
                                                               name=f"a2a-demo:{self.replica}")
        while not server.started:
            if self._serving.done():
                self._server = None
                self._serving.result()  # raises what failed the startup
                raise RuntimeError(f"the A2A demo agent {self.replica} stopped while starting")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """Stop serving (open streams get a second to finish) and release the port."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.should_exit = True
        if self._serving is not None:
            await self._serving
        self._socket = None

    async def __aenter__(self) -> DemoA2AAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


