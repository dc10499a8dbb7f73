"""Request and response heads: the exact bytes the relay sends (recorded from the
task-only relay before the callback fast path, which must not change a byte)."""

from __future__ import annotations

import re

import pytest

from sidecar.config import Settings, build
from sidecar.proxy.heads import KeyNames, Keys, request_head, response_head

_SETTINGS = build(Settings, {"load_balancer": {"hash_header": "X-Hash", "hash_cookie": "h"}})
NAMES = KeyNames(_SETTINGS.sticky, _SETTINGS.load_balancer)
PEER = b"127.0.0.9"
_TRACE = re.compile(rb"traceparent: 00-[0-9a-f]{32}-[0-9a-f]{16}-01\r\n")

REQUESTS = [
    pytest.param(b'GET', b'/x?y=1',
                 [(b'Host', b'chat.agents.local')],
                 b'chat.agents.local', False,
                 (b'GET /x?y=1 HTTP/1.1\r\n'
                  b'host: chat.agents.local\r\n'
                  b'x-forwarded-for: 127.0.0.9\r\n'
                  b'x-forwarded-proto: http\r\n'
                  b'x-forwarded-host: chat.agents.local\r\n'
                  b'traceparent: 00-b8ea71cd086019837cec53811690f32c-b0607eab1b02dfec-01\r\n'
                  b'\r\n'),
                 Keys(session=None, affinity_cookie=None, hash_key=None), False, id='plain'),
    pytest.param(b'POST', b'/',
                 [(b'Host', b'chat.agents.local:15001'),
                  (b'X-Drop-Me', b'1'),
                  (b'Connection', b'keep-alive, X-Drop-Me'),
                  (b'X-Forwarded-For', b'10.0.0.1'),
                  (b'x-forwarded-for', b' 10.0.0.2, 10.0.0.3 '),
                  (b'X-Forwarded-Proto', b'https'),
                  (b'X-Forwarded-Host', b'front.example'),
                  (b'traceparent', b'00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'),
                  (b'Cookie', b'a=1; sidecar_affinity=agent-2'),
                  (b'Cookie', b'h=k'),
                  (b'X-Session-Id', b's1'),
                  (b'Proxy-Authorization', b'x'),
                  (b'TE', b'trailers'),
                  (b'Keep-Alive', b'timeout=5'),
                  (b'Content-Length', b'5'),
                  (b'Accept', b'*/*')],
                 b'chat.agents.local', False,
                 (b'POST / HTTP/1.1\r\n'
                  b'Cookie: a=1; sidecar_affinity=agent-2\r\n'
                  b'Cookie: h=k\r\n'
                  b'X-Session-Id: s1\r\n'
                  b'Content-Length: 5\r\n'
                  b'Accept: */*\r\n'
                  b'host: chat.agents.local\r\n'
                  b'x-forwarded-for: 10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.9\r\n'
                  b'x-forwarded-proto: https\r\n'
                  b'x-forwarded-host: front.example\r\n'
                  b'traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n'
                  b'\r\n'),
                 Keys(session='s1', affinity_cookie='agent-2', hash_key='k'), False, id='forwarded'),
    pytest.param(b'GET', b'/ws',
                 [(b'Host', b'h'),
                  (b'Transfer-Encoding', b'chunked'),
                  (b'Connection', b'Upgrade'),
                  (b'Upgrade', b'websocket'),
                  (b'X-Hash', b'k1')],
                 b'h:8080', True,
                 (b'GET /ws HTTP/1.1\r\n'
                  b'X-Hash: k1\r\n'
                  b'host: h:8080\r\n'
                  b'x-forwarded-for: 127.0.0.9\r\n'
                  b'x-forwarded-proto: http\r\n'
                  b'x-forwarded-host: h:8080\r\n'
                  b'traceparent: 00-7b4498c29c663ab52194e6d7a71e7cdb-d73cd68d458636c7-01\r\n'
                  b'transfer-encoding: chunked\r\n'
                  b'connection: upgrade\r\n'
                  b'upgrade: websocket\r\n'
                  b'\r\n'),
                 Keys(session=None, affinity_cookie=None, hash_key='k1'), True, id='chunked-upgrade'),
]


@pytest.mark.parametrize(("method", "path", "headers", "host", "upgrade", "expected", "keys", "chunked"), REQUESTS)
def test_request_head(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], host: bytes, upgrade: bool,
                      expected: bytes, keys: Keys, chunked: bool) -> None:
    head, got_keys, got_chunked = request_head(method, path, headers, host, PEER, upgrade, NAMES)
    assert b"\r\ntraceparent: " + got_keys.traceparent + b"\r\n" in head  # the one sent is the one reported
    if b"traceparent: 00-0af7" not in expected:  # a new trace id each time: compare the rest
        assert _TRACE.search(head)
        head, expected = _TRACE.sub(b"", head), _TRACE.sub(b"", expected)
    assert head == expected
    assert got_keys.trace_from_client is (b"traceparent: 00-0af7" in expected)
    assert (got_keys.session, got_keys.affinity_cookie, got_keys.hash_key) == (keys.session, keys.affinity_cookie,
                                                                               keys.hash_key)
    assert got_chunked is chunked


RESPONSES = [
    pytest.param(200, b'OK',
                 [(b'Server', b'nginx'),
                  (b'Date', b'd'),
                  (b'Content-Type', b'text/plain'),
                  (b'Content-Length', b'13'),
                  (b'Connection', b'keep-alive')],
                 '1.1', True, False, False, 'a0', None,
                 (b'HTTP/1.1 200 OK\r\n'
                  b'Server: nginx\r\n'
                  b'Date: d\r\n'
                  b'Content-Type: text/plain\r\n'
                  b'Content-Length: 13\r\n'
                  b'x-sidecar-agent: a0\r\n'
                  b'\r\n'),
                 False, True, id='nginx'),
    pytest.param(200, b'OK',
                 [(b'Transfer-Encoding', b'chunked'),
                  (b'X-Foo', b'1'),
                  (b'Connection', b'X-Foo'),
                  (b'Keep-Alive', b't')],
                 '1.1', True, False, False, 'a1', 'sidecar_affinity=a1; Path=/; HttpOnly',
                 (b'HTTP/1.1 200 OK\r\n'
                  b'x-sidecar-agent: a1\r\n'
                  b'set-cookie: sidecar_affinity=a1; Path=/; HttpOnly\r\n'
                  b'transfer-encoding: chunked\r\n'
                  b'\r\n'),
                 True, True, id='chunked11'),
    pytest.param(200, b'OK',
                 [(b'Transfer-Encoding', b'chunked')],
                 '1.0', True, False, False, 'a1', None,
                 (b'HTTP/1.1 200 OK\r\n'
                  b'x-sidecar-agent: a1\r\n'
                  b'connection: close\r\n'
                  b'\r\n'),
                 False, False, id='chunked10'),
    pytest.param(200, b'OK',
                 [(b'Content-Length', b'0')],
                 '1.0', True, False, False, '', None,
                 (b'HTTP/1.1 200 OK\r\n'
                  b'Content-Length: 0\r\n'
                  b'connection: keep-alive\r\n'
                  b'\r\n'),
                 False, True, id='ka10'),
    pytest.param(404, b'Not Found',
                 [(b'Content-Length', b'0')],
                 '1.1', False, False, False, 'a2', None,
                 (b'HTTP/1.1 404 Not Found\r\n'
                  b'Content-Length: 0\r\n'
                  b'x-sidecar-agent: a2\r\n'
                  b'connection: close\r\n'
                  b'\r\n'),
                 False, False, id='noka'),
    pytest.param(204, b'No Content',
                 [],
                 '1.1', True, False, False, 'a2', None,
                 (b'HTTP/1.1 204 No Content\r\n'
                  b'x-sidecar-agent: a2\r\n'
                  b'\r\n'),
                 False, True, id='204'),
    pytest.param(200, b'OK',
                 [(b'Content-Type', b'x')],
                 '1.1', True, True, False, 'a2', None,
                 (b'HTTP/1.1 200 OK\r\n'
                  b'Content-Type: x\r\n'
                  b'x-sidecar-agent: a2\r\n'
                  b'\r\n'),
                 False, True, id='head'),
    pytest.param(101, b'Switching Protocols',
                 [(b'Connection', b'Upgrade'),
                  (b'Upgrade', b'websocket'),
                  (b'Sec-WebSocket-Accept', b'abc')],
                 '1.1', True, False, True, 'a0', None,
                 (b'HTTP/1.1 101 Switching Protocols\r\n'
                  b'Sec-WebSocket-Accept: abc\r\n'
                  b'x-sidecar-agent: a0\r\n'
                  b'connection: upgrade\r\n'
                  b'upgrade: websocket\r\n'
                  b'\r\n'),
                 False, True, id='101'),
]


@pytest.mark.parametrize(("status", "reason", "headers", "version", "keep_alive", "no_body", "upgraded", "agent",
                          "cookie", "expected", "frame_chunked", "keep"), RESPONSES)
def test_response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], version: str,
                       keep_alive: bool, no_body: bool, upgraded: bool, agent: str, cookie: str | None,
                       expected: bytes, frame_chunked: bool, keep: bool) -> None:
    assert response_head(status, reason, headers, version, keep_alive, no_body, upgraded, agent, cookie) == \
        (expected, frame_chunked, keep)
