"""Pure HTTP/1 head rewriting: the upstream request head and the client's response head.

No sockets, no policy: header lists in, bytes and the few facts the relay needs out
(stickiness and hash keys, the trace context sent upstream, body framing).
"""

from __future__ import annotations

import random
import re

from ..config import LoadBalancerSettings, StickySettings
from .affinity import cookie_value

HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
))
_TRACEPARENT = re.compile(rb"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_INVALID_TRACE = (b"0" * 32, b"0" * 16)


class Keys:
    """What the request says about stickiness and hashing (header values, cookie values),
    and the ``traceparent`` sent upstream (the client's when valid, else a new one)."""

    # A plain class, not a dataclass: mypyc gives a dataclass the generated Python __init__ (a Python
    # call per request); this one is native.
    __slots__ = ("affinity_cookie", "hash_key", "session", "trace_from_client", "traceparent")

    def __init__(self, session: str | None = None, affinity_cookie: str | None = None, hash_key: str | None = None,
                 traceparent: bytes = b"", trace_from_client: bool = False) -> None:
        self.session = session
        self.affinity_cookie = affinity_cookie
        self.hash_key = hash_key
        self.traceparent = traceparent
        self.trace_from_client = trace_from_client  # the client sent a valid traceparent (else a new trace begins)

    def __repr__(self) -> str:
        return (f"Keys(session={self.session!r}, affinity_cookie={self.affinity_cookie!r}, "
                f"hash_key={self.hash_key!r}, traceparent={self.traceparent!r})")

class KeyNames:
    """The request headers and cookies that name a session or a hash key, as the head scan wants them."""

    __slots__ = ("balancing", "cookie", "hash_cookie", "hash_header", "session", "sticky")

    def __init__(self, sticky: StickySettings, balancing: LoadBalancerSettings) -> None:
        self.sticky = sticky
        self.balancing = balancing
        self.session = sticky.header.lower().encode()
        self.cookie = sticky.cookie
        self.hash_header = balancing.hash_header.lower().encode()
        self.hash_cookie = balancing.hash_cookie


_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"upgrade"))
_NO_TOKENS: frozenset[bytes] = frozenset()


def _connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    """Header names listed in ``Connection`` headers beyond the standard hop-by-hop ones."""
    if len(values) == 1 and values[0].lower() in _PLAIN_CONNECTION:
        return _NO_TOKENS
    return frozenset(t.strip().lower() for v in values for t in v.split(b",")) - HOP_BY_HOP


# Request headers the head scan acts on besides copying (hop-by-hop ones included).
_REQUEST_SEEN = HOP_BY_HOP | {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"traceparent",
                              b"cookie"}


def request_head(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], host: bytes, peer: bytes,
                 upgrade: bool, names: KeyNames, drop: frozenset[bytes] = frozenset(),
                 sampled: bool = True) -> tuple[bytes, Keys, bool]:
    """(upstream request head, stickiness/hash keys, body chunked?): hop-by-hop headers and those
    named in ``Connection`` dropped, one ``X-Forwarded-For`` with ``peer`` appended,
    ``X-Forwarded-Proto``/``-Host``, a valid or new ``traceparent`` (a new one with the
    sampled flag ``sampled``), the given ``host``."""
    session_name = names.session
    hash_header = names.hash_header
    forwarded_for: list[bytes] = []
    connection: list[bytes] = []
    proto = forwarded_host = traceparent = b""
    chunked = False
    keys = Keys()
    cookies: list[bytes] = []
    out = [method, b" ", path, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lower = name.lower()
        if drop and lower in drop:
            continue
        if lower in _REQUEST_SEEN:
            if lower in HOP_BY_HOP:
                if lower == b"connection":
                    connection.append(value)
                elif lower == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                continue
            if lower == b"host":
                continue
            if lower == b"x-forwarded-for":
                forwarded_for.append(value.strip())
                continue
            if lower == b"traceparent":
                if _TRACEPARENT.match(value) and value[3:35] != _INVALID_TRACE[0] and value[36:52] != \
                        _INVALID_TRACE[1] and value[:2] != b"ff":
                    traceparent = value
                continue
            # A client's own X-Forwarded-Proto/-Host (it came through another proxy) is kept, once.
            if lower == b"x-forwarded-proto":
                proto = value
                continue
            if lower == b"x-forwarded-host":
                forwarded_host = value
                continue
            cookies.append(value)
        if lower == session_name:
            keys.session = value.decode("latin-1")
        if lower == hash_header:
            keys.hash_key = value.decode("latin-1")
        out += (name, b": ", value, b"\r\n")
    if connection and not drop:
        tokens = _connection_tokens(connection)
        if tokens:  # rare: Connection names end-to-end headers; scan again without them
            return request_head(method, path, headers, host, peer, upgrade, names, tokens, sampled)
    if cookies:
        text = "; ".join(c.decode("latin-1") for c in cookies)
        keys.affinity_cookie = cookie_value(text, names.cookie)
        if names.hash_cookie and keys.hash_key is None:
            keys.hash_key = cookie_value(text, names.hash_cookie)
    if forwarded_for:
        forwarded_for.append(peer)
        xff = b", ".join(f for f in forwarded_for if f)
    else:
        xff = peer
    if not traceparent:
        traceparent = b"00-%032x-%016x-%s" % (random.getrandbits(128) or 1, random.getrandbits(64) or 1,
                                             b"01" if sampled else b"00")
    else:
        keys.trace_from_client = True
    keys.traceparent = traceparent
    out += (b"host: ", host, b"\r\nx-forwarded-for: ", xff, b"\r\nx-forwarded-proto: ", proto or b"http",
            b"\r\nx-forwarded-host: ", forwarded_host or host, b"\r\ntraceparent: ", traceparent, b"\r\n")
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if upgrade:
        for name, value in headers:
            if name.lower() == b"upgrade":
                out += (b"connection: upgrade\r\nupgrade: ", value, b"\r\n")
                break
    out.append(b"\r\n")
    return b"".join(out), keys, chunked


def response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], version: str, keep_alive: bool,
                  no_body: bool, upgraded: bool, agent_id: str, set_cookie: str | None,
                  drop: frozenset[bytes] = frozenset()) -> tuple[bytes, bool, bool]:
    """(head for the client, re-chunk the body?, keep the client connection?): hop-by-hop headers
    and those named in ``Connection`` dropped, ``x-sidecar-agent`` and ``set-cookie`` added, framing
    and ``Connection`` fitted to the client's HTTP version."""
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    length = False
    upgrade_value = b""
    connection: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == b"connection":
                connection.append(value)
            elif lower == b"upgrade":
                upgrade_value = value
            continue
        if drop and lower in drop:
            continue
        if lower == b"content-length":
            length = True
        out += (name, b": ", value, b"\r\n")
    if connection and not drop and (len(connection) > 1 or connection[0].lower() not in _PLAIN_CONNECTION):
        tokens = _connection_tokens(connection)
        if tokens:
            return response_head(status, reason, headers, version, keep_alive, no_body, upgraded, agent_id,
                                 set_cookie, tokens)
    if agent_id:
        out += (b"x-sidecar-agent: ", agent_id.encode(), b"\r\n")
    if set_cookie:
        out += (b"set-cookie: ", set_cookie.encode("latin-1"), b"\r\n")
    frame_chunked = False
    keep = keep_alive
    if upgraded:
        out += (b"connection: upgrade\r\nupgrade: ", upgrade_value, b"\r\n")
    elif not no_body and status != 204 and status != 304 and not length:
        # Upstream chunked or close-delimited: the relay frames the body for the client.
        if version == "1.1":
            frame_chunked = True
            out.append(b"transfer-encoding: chunked\r\n")
        else:
            keep = False
    if not upgraded:
        if not keep:
            out.append(b"connection: close\r\n")
        elif version == "1.0":
            out.append(b"connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out), frame_chunked, keep



def retry_after(headers: list[tuple[bytes, bytes]]) -> float:
    """Seconds asked for by a ``Retry-After`` header (1 for an HTTP-date), 0.0 without one."""
    for name, value in headers:
        if name.lower() == b"retry-after":
            text = value.strip()
            if text.isdigit():
                return float(text)
            return 1.0  # an HTTP-date: back off a little rather than parse clocks
    return 0.0
