"""A2A-aware routing, the pure part: JSON-RPC calls in, task/context owners learnt, cards rewritten.

A task lives on the replica that created it: ``tasks/get``, ``tasks/cancel``,
resubscriptions and messages naming it must reach that replica, and so must
messages of a context (an unknown context id silently starts a new task
elsewhere). ``read_call`` reads what a request names, ``ids_in`` what a result
or one stream event names, ``EventScanner`` finds those in an SSE stream as it
passes (a partial line is all it keeps), ``Owners`` remembers task -> agent and
context -> agent with bounded memory, and ``rewrite_card`` points a card's
interfaces back at the in-zone name the client used. Method names of spec v0.3
and v1.0 are both read (docs/a2a-wire.md has the shapes).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# Calls that name a task: get, cancel, resubscribe and the push-notification configs.
TASK_METHODS = frozenset((
    "tasks/get", "tasks/cancel", "tasks/resubscribe", "tasks/pushNotificationConfig/set",
    "tasks/pushNotificationConfig/get", "tasks/pushNotificationConfig/list", "tasks/pushNotificationConfig/delete",
    "GetTask", "CancelTask", "SubscribeToTask", "CreateTaskPushNotificationConfig", "GetTaskPushNotificationConfig",
    "ListTaskPushNotificationConfigs", "DeleteTaskPushNotificationConfig",
))
# Calls that carry a message, which may name a task or a context.
MESSAGE_METHODS = frozenset(("message/send", "message/stream", "SendMessage", "SendStreamingMessage"))
_RESULT_WRAPPERS = ("task", "message", "statusUpdate", "artifactUpdate")


@dataclass(frozen=True, slots=True)
class Call:
    """What one JSON-RPC request names: its method, and the task and context it is about."""

    method: str
    task_id: str | None = None
    context_id: str | None = None

    @property
    def routed(self) -> bool:
        """Whether the call names a task or context (and so may have an owner)."""
        return self.task_id is not None or self.context_id is not None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def read_call(body: bytes) -> Call | None:
    """The A2A JSON-RPC call in a request body, or None when the body is not one (then it is relayed as is)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("jsonrpc") != "2.0" or not isinstance(data.get("method"), str):
        return None
    method = data["method"]
    params = data.get("params")
    if not isinstance(params, dict):
        return Call(method)
    if method in TASK_METHODS:
        # Push-notification configs name the task "taskId" (their own "id" is the config's), the rest "id".
        return Call(method, task_id=_text(params.get("taskId")) or _text(params.get("id")))
    if method in MESSAGE_METHODS:
        message = params.get("message")
        if isinstance(message, dict):
            return Call(method, _text(message.get("taskId")), _text(message.get("contextId")))
    return Call(method)


def ids_in(response: object) -> tuple[str | None, str | None]:
    """(task id, context id) a decoded JSON-RPC response or stream event names; (None, None) for errors."""
    if not isinstance(response, dict):
        return None, None
    result = response.get("result")
    if not isinstance(result, dict):
        return None, None
    inner = result
    for key in _RESULT_WRAPPERS:  # v1.0 wraps the object in a key naming its kind
        wrapped = result.get(key)
        if isinstance(wrapped, dict):
            inner = wrapped
            break
    task = _text(inner.get("taskId"))
    if task is None and ("status" in inner or inner.get("kind") == "task"):
        task = _text(inner.get("id"))  # a Task object: its own id
    return task, _text(inner.get("contextId"))


def ids_in_body(body: bytes) -> tuple[str | None, str | None]:
    """``ids_in`` of a JSON body; (None, None) when it is not JSON."""
    try:
        return ids_in(json.loads(body))
    except (ValueError, UnicodeDecodeError):
        return None, None


class EventScanner:
    """Finds task and context ids in a text/event-stream as it passes, without holding the stream.

    ``feed`` takes the bytes just relayed and returns the ids of every event they
    completed. Only the current event's ``data:`` lines are kept, up to ``limit``
    bytes; a longer event is skipped.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._line = bytearray()
        self._data: list[bytes] = []
        self._size = 0
        self._skipping = False

    def feed(self, chunk: bytes) -> list[tuple[str | None, str | None]]:
        found: list[tuple[str | None, str | None]] = []
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._partial(chunk[start:])
                return found
            self._partial(chunk[start:end])
            line = bytes(self._line).rstrip(b"\r")
            self._line.clear()
            start = end + 1
            if not line:
                if self._data and not self._skipping:
                    ids = ids_in_body(b"\n".join(self._data))
                    if ids != (None, None):
                        found.append(ids)
                self._data, self._size, self._skipping = [], 0, False
            elif line.startswith(b"data:") and not self._skipping:
                value = line[5:].removeprefix(b" ")
                self._size += len(value)
                if self._size > self._limit:
                    self._data, self._skipping = [], True
                else:
                    self._data.append(value)

    def _partial(self, piece: bytes) -> None:
        if len(self._line) + len(piece) > self._limit + 16:
            self._skipping = True  # a line this long is no event we read; drop what is kept of it
            self._line.clear()
            return
        self._line += piece


class Owners:
    """task -> agent id and context -> agent id, each bounded (least recently used go first) and idle-expired."""

    def __init__(self, max_tasks: int, max_contexts: int, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._tasks: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._contexts: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._clock = clock
        self.update(max_tasks, max_contexts, ttl)

    def update(self, max_tasks: int, max_contexts: int, ttl: float) -> None:
        """New bounds (live); entries over them are dropped at the next write."""
        self.max_tasks, self.max_contexts, self.ttl = max_tasks, max_contexts, ttl

    def __len__(self) -> int:
        return len(self._tasks) + len(self._contexts)

    def learn(self, task_id: str | None, context_id: str | None, agent_id: str) -> None:
        """Remember that ``agent_id`` holds this task and context."""
        now = self._clock()
        if task_id is not None:
            _put(self._tasks, task_id, agent_id, now, self.max_tasks)
        if context_id is not None:
            _put(self._contexts, context_id, agent_id, now, self.max_contexts)

    def owner(self, call: Call) -> str | None:
        """The agent holding the call's task (first) or context, if known and not idle too long."""
        now = self._clock()
        if call.task_id is not None:
            found = _get(self._tasks, call.task_id, now, self.ttl)
            if found is not None:
                return found
        if call.context_id is not None:
            return _get(self._contexts, call.context_id, now, self.ttl)
        return None


def _put(table: OrderedDict[str, tuple[str, float]], key: str, agent_id: str, now: float, limit: int) -> None:
    table[key] = (agent_id, now)
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


def _get(table: OrderedDict[str, tuple[str, float]], key: str, now: float, ttl: float) -> str | None:
    entry = table.get(key)
    if entry is None:
        return None
    agent_id, seen = entry
    if now - seen > ttl:
        del table[key]
        return None
    table[key] = (agent_id, now)
    table.move_to_end(key)
    return agent_id


def rewrite_card(raw: bytes, authority: str, scheme: str = "http") -> bytes:
    """The card with every http(s) interface URL pointed at ``scheme://authority`` (path kept), no signatures.

    ``authority`` is the in-zone name the client used (``research.agents.local``),
    so that the calls a client makes from the card come back through the sidecar.
    gRPC interface URLs are left as they are (the HTTP proxy does not carry them).
    """
    card: Any = json.loads(raw)
    if not isinstance(card, dict):
        raise ValueError("a card is a JSON object")

    def point(url: object) -> object:
        if not isinstance(url, str):
            return url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return url
        return urlunsplit((scheme, authority, parts.path or "/", parts.query, parts.fragment))

    if "url" in card:
        card["url"] = point(card["url"])
    for key in ("supportedInterfaces", "additionalInterfaces"):
        interfaces = card.get(key)
        if isinstance(interfaces, list):
            for interface in interfaces:
                if isinstance(interface, dict) and "url" in interface:
                    interface["url"] = point(interface["url"])
    card.pop("signatures", None)
    return json.dumps(card, separators=(",", ":")).encode()


class Learner:
    """Reads one A2A response as it is relayed and tells ``owners`` which task and context ``agent_id`` holds.

    An event stream is scanned line by line; a JSON body is kept up to ``limit``
    bytes and read at its end. Nothing is held back from the client.
    """

    __slots__ = ("_agent_id", "_body", "_limit", "_owners", "_scanner")

    def __init__(self, owners: Owners, agent_id: str, limit: int, content_type: bytes) -> None:
        self._owners = owners
        self._agent_id = agent_id
        self._limit = limit
        self._scanner = EventScanner(limit) if b"text/event-stream" in content_type.lower() else None
        self._body: bytearray | None = None if self._scanner is not None else bytearray()

    def feed(self, chunk: bytes) -> None:
        scanner = self._scanner
        if scanner is not None:
            for task_id, context_id in scanner.feed(chunk):
                self._owners.learn(task_id, context_id, self._agent_id)
        elif self._body is not None:
            self._body += chunk
            if len(self._body) > self._limit:
                self._body = None

    def close(self) -> None:
        """The response ended: read the JSON body."""
        if self._body:
            task_id, context_id = ids_in_body(bytes(self._body))
            self._owners.learn(task_id, context_id, self._agent_id)
        self._body = None


CARD_PATHS = frozenset((b"/.well-known/agent-card.json", b"/.well-known/agent.json"))


class A2aRouting:
    """What the relay needs for A2A: task/context owners, the registry's cards and the limits (live)."""

    __slots__ = ("cards", "max_body", "max_card_bytes", "owners", "stream_idle_timeout")

    def __init__(self, owners: Owners, cards: Any, max_body: int, stream_idle_timeout: float,
                 max_card_bytes: int) -> None:
        self.owners = owners
        self.cards = cards  # a CardIndex
        self.max_body = max_body
        self.stream_idle_timeout = stream_idle_timeout
        self.max_card_bytes = max_card_bytes  # a card read from an agent: larger ones are not rewritten

    def update(self, settings: Any, stream_idle_timeout: float) -> None:
        """New ``a2a`` settings (an A2aSettings) and stream idle timeout; learnt owners are kept."""
        self.max_body = settings.max_body
        self.max_card_bytes = settings.max_card_bytes
        self.owners.update(settings.max_tasks, settings.max_contexts, settings.ttl)
        self.stream_idle_timeout = stream_idle_timeout


async def fetch_card(address: str, port: int, path: bytes, limit: int, timeout: float) -> bytes | None:
    """The card an agent serves at ``path`` (200, at most ``limit`` bytes), or None.

    Kept out of the mypyc-compiled relay: an ``async with`` over aiohttp in compiled code
    mishandled the exception of a refused connection (found by tests/fuzz/fuzz_http.py).
    """
    import aiohttp

    url = f"http://{address}:{port}{path.decode('latin-1')}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), trust_env=False) as session:
            async with session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    return None
                raw = await response.content.read(limit + 1)
    except (TimeoutError, OSError, aiohttp.ClientError):
        return None
    return raw if len(raw) <= limit else None
