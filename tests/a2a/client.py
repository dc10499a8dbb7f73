"""Talking to A2A agents in tests: the official SDK client, and raw JSON-RPC for exact wire shapes.

``connect(base_url, proxy=...)`` resolves the card at ``base_url`` with the SDK's
card resolver and builds an SDK client from it, on one httpx client that sends
everything through ``proxy`` when given (``http://127.0.0.1:<proxy port>`` with
a base URL such as ``http://research.agents.local``). The SDK client calls the
interface URL of the card, so through a proxy that URL must be the in-zone name
(the card rewrite). ``rpc``/``rpc_stream`` post to ``base_url`` itself.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from a2a.client import A2ACardResolver, Client, ClientConfig, ClientFactory
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    SendMessageRequest,
    StreamResponse,
    Task,
)
from a2a.utils.signing import create_signature_verifier
from google.protobuf.json_format import MessageToDict

from sidecar.demo_a2a import DEMO_SIGNING_KEY

# v0.3 method names; the SDK server reads a request without an A2A-Version header as 0.3,
# and wants "A2A-Version: 1.0" with the v1.0 names.
V03_METHODS = frozenset(("message/send", "message/stream", "tasks/get", "tasks/cancel", "tasks/resubscribe",
                         "tasks/pushNotificationConfig/set", "tasks/pushNotificationConfig/get",
                         "tasks/pushNotificationConfig/list", "tasks/pushNotificationConfig/delete",
                         "agent/getAuthenticatedExtendedCard"))

verify_demo_signature = create_signature_verifier(lambda kid, jku: DEMO_SIGNING_KEY, ["HS256"])


def version_of(method: str) -> str:
    """The A2A-Version header value the SDK server expects with ``method``."""
    return "0.3" if method in V03_METHODS else "1.0"


Events = AsyncIterator[dict[str, Any]]


@dataclass
class Connection:
    """An SDK client bound to one agent card, plus the httpx client under it (for raw calls)."""

    base_url: str
    http: httpx.AsyncClient
    card: AgentCard
    client: Client  # streams when the card says the agent can
    blocking_client: Client  # never streams: one answer per SendMessage
    sent: list[str]  # the JSON-RPC method of every POST this connection made, in order

    async def send(self, text: str, *, context_id: str = "", task_id: str = "",
                   return_immediately: bool = False) -> StreamResponse:
        """One non-streaming SendMessage via the SDK client: its result (a task or a message)."""
        request = SendMessageRequest(message=user_message(text, context_id=context_id, task_id=task_id))
        request.configuration.return_immediately = return_immediately
        results = [event async for event in self.blocking_client.send_message(request)]
        assert len(results) == 1, results
        return results[0]

    def stream(self, text: str, *, context_id: str = "", task_id: str = "") -> AsyncIterator[StreamResponse]:
        """A SendStreamingMessage via the SDK client: its events as they arrive."""
        request = SendMessageRequest(message=user_message(text, context_id=context_id, task_id=task_id))
        return self.client.send_message(request)

    async def get_task(self, task_id: str) -> Task:
        """GetTask via the SDK client."""
        return await self.client.get_task(GetTaskRequest(id=task_id))

    async def cancel_task(self, task_id: str) -> Task:
        """CancelTask via the SDK client."""
        return await self.client.cancel_task(CancelTaskRequest(id=task_id))

    async def rpc(self, method: str, params: dict[str, Any], *, request_id: int | str = 1) -> dict[str, Any]:
        """A raw JSON-RPC call to ``base_url`` (the right A2A-Version header for the method's version)."""
        response = await self.http.post(self.base_url + "/", json=envelope(method, params, request_id),
                                        headers={"A2A-Version": version_of(method)})
        response.raise_for_status()
        return dict(response.json())

    @asynccontextmanager
    async def rpc_stream(self, method: str, params: dict[str, Any], *,
                         request_id: int | str = 1) -> AsyncIterator[tuple[httpx.Response, Events]]:
        """A raw streaming call: the response (headers) and its SSE ``data:`` payloads as they arrive."""
        async with self.http.stream("POST", self.base_url + "/", json=envelope(method, params, request_id),
                                    headers={"A2A-Version": version_of(method)}) as response:
            yield response, sse_data(response)


def envelope(method: str, params: dict[str, Any], request_id: int | str = 1) -> dict[str, Any]:
    """A JSON-RPC 2.0 request."""
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


async def sse_data(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The decoded ``data:`` payloads of an SSE response, one per event, as they arrive."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []


def user_message(text: str, *, context_id: str = "", task_id: str = "") -> Message:
    """A user text message with a fresh id (optionally continuing a context or task)."""
    message = Message(role="ROLE_USER", message_id=uuid.uuid4().hex, context_id=context_id, task_id=task_id)
    message.parts.add(text=text)
    return message


def v1_message(text: str, **fields: str) -> dict[str, Any]:
    """SendMessage params in the v1.0 JSON shape."""
    return {"message": {"role": "ROLE_USER", "messageId": f"m-{text[:8]}", "parts": [{"text": text}], **fields}}


def v03_message(text: str, **fields: Any) -> dict[str, Any]:
    """message/send params in the v0.3 JSON shape (extra keys go into params, e.g. configuration)."""
    message_fields = {k: v for k, v in fields.items() if k in ("contextId", "taskId")}
    params: dict[str, Any] = {"message": {"kind": "message", "role": "user", "messageId": f"m-{text[:8]}",
                                          "parts": [{"kind": "text", "text": text}], **message_fields}}
    params.update({k: v for k, v in fields.items() if k not in message_fields})
    return params


def replica_of(item: Task | Message | StreamResponse | dict[str, Any]) -> str:
    """The replica that produced ``item`` (its ``metadata.replica``, wherever the item keeps it)."""
    data = item if isinstance(item, dict) else MessageToDict(item)
    for key in ("task", "message", "statusUpdate", "artifactUpdate"):
        if key in data:  # a StreamResponse / v1.0 SendMessage result
            data = data[key]
            break
    meta = data.get("metadata") or data.get("artifact", {}).get("metadata") or {}
    return str(meta.get("replica", ""))


@asynccontextmanager
async def connect(base_url: str, *, proxy: str | None = None, protocol_version: str = "1.0",
                  verify_signature: bool = True, timeout: float = 10.0) -> AsyncIterator[Connection]:
    """Resolve the card at ``base_url`` with the SDK's resolver and build SDK clients for it.

    ``verify_signature`` checks the demo agent's card signature (a card rewritten
    by a proxy has none: pass False there). ``protocol_version="0.3"`` keeps only
    the card's 0.3 interfaces, so the SDK talks its v0.3 compatibility transport
    (v0.3 method names) to the agent.
    """
    sent: list[str] = []

    async def record(request: httpx.Request) -> None:
        if request.method == "POST":
            sent.append(str(json.loads(request.content).get("method", "")))

    async with httpx.AsyncClient(proxy=proxy, trust_env=False, timeout=timeout,
                                 event_hooks={"request": [record]}) as http:
        card = await A2ACardResolver(http, base_url).get_agent_card(
            signature_verifier=verify_demo_signature if verify_signature else None)
        chosen = AgentCard()
        chosen.CopyFrom(card)
        keep = [i for i in card.supported_interfaces if i.protocol_version.startswith(protocol_version)]
        del chosen.supported_interfaces[:]
        chosen.supported_interfaces.extend(keep)
        if not keep:
            raise AssertionError(f"the card at {base_url} has no {protocol_version} interface")
        streaming = ClientFactory(ClientConfig(httpx_client=http, streaming=True)).create(chosen)
        blocking = ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create(chosen)
        yield Connection(base_url.rstrip("/"), http, card, streaming, blocking, sent)
