"""Coverage-guided fuzzing of the proxy's request path (httptools parsing, head checks and rewriting,
routing, A2A call reading, error answers) with atheris.

    python tests/fuzz/fuzz_http.py -runs=1000000 -max_len=2048 CORPUS_DIR
    python tests/fuzz/fuzz_http.py --seed CORPUS_DIR     # writes valid requests to start from

Each input is fed, as one client connection, to the real Relay and ClientConnection (fake
transports, no sockets); upstream answers are a fixed response. A crash is an exception that
escapes a callback or reaches the event loop's handler, or bytes written to the client that
are not a sequence of well-formed HTTP/1.1 responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

import atheris
import httptools

# Only the sidecar's modules are instrumented (asyncio and the rest would cost more than the run).
with contextlib.nullcontext() if os.environ.get("FUZZ_SMOKE") else atheris.instrument_imports(include=["sidecar"]):
    from sidecar.catalog import Catalog, Reset
    from sidecar.config import Settings, build
    from sidecar.metrics import Metrics
    from sidecar.model import Agent
    from sidecar.proxy.relay import Relay
    from sidecar.proxy.server import ProxyServer
    from sidecar.proxy.upstream import Upstream

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Transport:
    """Collects what is written; the rest does nothing."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, data: object) -> None:
        for chunk in data:  # type: ignore[attr-defined]
            self.out += chunk

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Responses:
    """httptools callbacks that only check the client's bytes parse as responses."""

    def on_message_complete(self) -> None: ...


LOOP = asyncio.new_event_loop()
ERRORS: list[object] = []
LOOP.set_exception_handler(lambda loop, context: ERRORS.append(context))


def build_relay() -> Relay:
    agents = {f"/services/f/a{i}": Agent(id=f"a{i}", name="f", address="127.0.0.1", port=18000 + i,
                                        capabilities=("chat",)) for i in range(2)}
    catalog = Catalog()
    catalog.apply([Reset(1, agents)])
    settings = build(Settings, {"proxy": {"passthrough": False, "max_header_bytes": 4096}})
    proxy = ProxyServer(settings, catalog, Metrics().proxy)
    relay = Relay(settings.proxy, settings.dns.domain, catalog, proxy.policy, proxy.metrics, LOOP, a2a=proxy.a2a)
    return relay


async def _one(relay: Relay, data: bytes) -> bytes:
    for agent_port in (18000, 18001):
        conn = Upstream(relay, ("127.0.0.1", agent_port))
        conn.connection_made(Transport())  # type: ignore[arg-type]
        relay.pool.release(conn)
    client = relay.protocol()
    transport = Transport()
    client.connection_made(transport)  # type: ignore[arg-type]
    half = len(data) // 2
    for piece in (data[:half], data[half:]):
        client.data_received(piece)
        for _ in range(3):
            upstream = client.upstream
            if upstream is not None and upstream.exchange is not None:
                upstream.data_received(RESPONSE)
            await asyncio.sleep(0)
    client.connection_lost(None)
    for _ in range(3):
        await asyncio.sleep(0)
    relay.pool.close()
    return bytes(transport.out)


RELAY = build_relay()


def mutated(data: bytes) -> bytes:
    """Without coverage feedback (FUZZ_SMOKE, or compiled modules), inputs are built from the valid
    requests: the first byte picks one, then (position, byte, action) triples change it."""
    if not data:
        return data
    request = bytearray(SEEDS[data[0] % len(SEEDS)])
    for i in range(1, len(data) - 2, 3):
        at, value, action = data[i] * 7 % (len(request) + 1), data[i + 1], data[i + 2] % 4
        if action == 0:
            request[at:at + 1] = bytes((value,))
        elif action == 1:
            request[at:at] = bytes((value,))
        elif action == 2:
            del request[at:at + 1 + value % 8]
        else:
            request[at:at] = request[value % max(1, len(request)):][:16]
    return bytes(request)


def one(data: bytes) -> None:
    if MUTATE:
        data = mutated(data)
    out = LOOP.run_until_complete(_one(RELAY, data))
    if ERRORS:
        raise AssertionError(f"the event loop caught {ERRORS.pop()!r}")
    if out:
        parser = httptools.HttpResponseParser(Responses())
        try:
            parser.feed_data(out)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as exc:
            raise AssertionError(f"not HTTP responses: {exc}: {out[:200]!r}") from None


RPC = b'{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"id":"t"}}'
SEEDS = [
        b"GET / HTTP/1.1\r\nHost: chat.agents.local\r\n\r\n",
        b"GET http://chat.agents.local/x?y=1 HTTP/1.1\r\nHost: other\r\nX-Session-Id: s\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: chat.agents.local\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(RPC), RPC),
        b"POST /u HTTP/1.1\r\nHost: f.service.agents.local\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"GET /.well-known/agent-card.json HTTP/1.1\r\nHost: a0.id.agents.local\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n",
        b"CONNECT chat.agents.local:80 HTTP/1.1\r\nHost: chat.agents.local:80\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: chat.agents.local\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: chat.agents.local\r\nConnection: keep-alive, x-drop\r\nx-drop: 1\r\n"
        b"Cookie: sidecar_affinity=a1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: chat.agents.local\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: chat.agents.local\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
]
# FUZZ_RAW: the inputs are requests as they are (the regression inputs in regressions/http/).
MUTATE = bool(os.environ.get("FUZZ_SMOKE")) and not os.environ.get("FUZZ_RAW")


def seed(directory: str) -> None:
    """Valid (and a few invalid) requests for every kind of target, as a starting corpus."""
    os.makedirs(directory, exist_ok=True)
    for i, request in enumerate(SEEDS):
        with open(os.path.join(directory, f"r{i}"), "wb") as handle:
            handle.write(request)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--seed":
        seed(sys.argv[2])
    else:
        atheris.Setup(sys.argv, one)
        atheris.Fuzz()
