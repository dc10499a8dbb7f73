"""The pure A2A routing pieces: calls read, ids learnt from results and streams, owners bounded, cards rewritten."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.proxy.a2a import Call, EventScanner, Owners, ids_in, ids_in_body, read_call, rewrite_card


def rpc(method: str, params: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


@pytest.mark.parametrize(("body", "call"), [
    (rpc("tasks/get", {"id": "T"}), Call("tasks/get", "T")),
    (rpc("GetTask", {"id": "T"}), Call("GetTask", "T")),
    (rpc("CancelTask", {"id": "T"}), Call("CancelTask", "T")),
    (rpc("tasks/resubscribe", {"id": "T"}), Call("tasks/resubscribe", "T")),
    (rpc("SubscribeToTask", {"id": "T"}), Call("SubscribeToTask", "T")),
    (rpc("GetTaskPushNotificationConfig", {"taskId": "T", "id": "cfg"}), Call("GetTaskPushNotificationConfig", "T")),
    (rpc("tasks/pushNotificationConfig/get", {"id": "T"}), Call("tasks/pushNotificationConfig/get", "T")),
    (rpc("message/send", {"message": {"taskId": "T", "contextId": "C"}}), Call("message/send", "T", "C")),
    (rpc("SendStreamingMessage", {"message": {"contextId": "C"}}), Call("SendStreamingMessage", None, "C")),
    (rpc("SendMessage", {"message": {"parts": []}}), Call("SendMessage")),
    (rpc("ListTasks", {}), Call("ListTasks")),
    (rpc("tasks/get", "not params"), Call("tasks/get")),
    (b'{"jsonrpc": "1.0", "method": "x"}', None),
    (b"[1, 2]", None),
    (b"not json at all", None),
    (b"\xff\xfe", None),
])
def test_read_call(body: bytes, call: Call | None) -> None:
    assert read_call(body) == call


@pytest.mark.parametrize(("response", "ids"), [
    ({"result": {"task": {"id": "T", "contextId": "C", "status": {}}}}, ("T", "C")),  # v1.0 send -> task
    ({"result": {"message": {"messageId": "m", "contextId": "C"}}}, (None, "C")),      # v1.0 send -> message
    ({"result": {"id": "T", "contextId": "C", "status": {"state": "working"}}}, ("T", "C")),  # GetTask
    ({"result": {"kind": "task", "id": "T", "contextId": "C"}}, ("T", "C")),           # v0.3 task
    ({"result": {"kind": "message", "messageId": "m", "contextId": "C"}}, (None, "C")),  # v0.3 message
    ({"result": {"statusUpdate": {"taskId": "T", "contextId": "C"}}}, ("T", "C")),     # v1.0 event
    ({"result": {"kind": "artifact-update", "taskId": "T", "contextId": "C"}}, ("T", "C")),  # v0.3 event
    ({"error": {"code": -32001, "message": "Task not found"}}, (None, None)),
    ({"result": "ok"}, (None, None)),
    ([], (None, None)),
])
def test_ids_in_results_and_events(response: object, ids: tuple) -> None:
    assert ids_in(response) == ids


def test_the_scanner_reads_events_across_chunks_and_keeps_only_a_partial_line() -> None:
    stream = (b'data: {"result": {"task": {"id": "T1", "contextId": "C1", "status": {}}}}\r\n\r\n'
              b": ping - 2026-12-01\r\n\r\n"
              b'data: {"result": {"kind": "status-update", "taskId": "T1", "contextId": "C1"}}\n\n'
              b'data: {"error": {"code": 1}}\n\n'
              b'event: x\ndata: {"result": \ndata: {"kind": "task", "id": "T2", "status": {}}}\n\n')
    whole = EventScanner(1 << 20).feed(stream)
    assert whole == [("T1", "C1"), ("T1", "C1"), ("T2", None)]
    for size in (1, 2, 7, 64):
        scanner = EventScanner(1 << 20)
        found = []
        for i in range(0, len(stream), size):
            found += scanner.feed(stream[i:i + size])
        assert found == whole, size
        assert len(scanner._line) == 0


def test_an_event_over_the_limit_is_skipped_and_the_next_one_read() -> None:
    big = b'data: {"result": {"kind": "task", "id": "BIG", "status": {}, "pad": "' + b"x" * 500 + b'"}}\n\n'
    small = b'data: {"result": {"kind": "task", "id": "S", "status": {}}}\n\n'
    scanner = EventScanner(200)
    assert scanner.feed(big + small) == [("S", None)]
    assert len(scanner._line) <= 216


@given(st.binary(max_size=300))
def test_the_scanner_takes_any_bytes(data: bytes) -> None:
    scanner = EventScanner(64)
    for i in range(0, len(data), 13):
        scanner.feed(data[i:i + 13])
    assert len(scanner._line) <= 64 + 16


def test_owners_are_bounded_and_forget_idle_entries() -> None:
    now = [0.0]
    owners = Owners(max_tasks=2, max_contexts=2, ttl=10, clock=lambda: now[0])
    owners.learn("t1", "c1", "a")
    owners.learn("t2", None, "b")
    assert owners.owner(Call("GetTask", "t1")) == "a"  # t1 is now the most recent
    owners.learn("t3", None, "c")                       # t2, least recently used, goes
    assert owners.owner(Call("GetTask", "t2")) is None
    assert owners.owner(Call("GetTask", "t3")) == "c"
    assert owners.owner(Call("SendMessage", None, "c1")) == "a"
    assert owners.owner(Call("SendMessage", "unknown", "c1")) == "a", "a known context when the task is unknown"
    now[0] = 9.0
    assert owners.owner(Call("GetTask", "t1")) == "a", "a use keeps an entry fresh"
    now[0] = 19.5
    assert owners.owner(Call("GetTask", "t3")) is None and owners.owner(Call("GetTask", "t1")) is None
    assert owners.owner(Call("ListTasks")) is None
    assert len(owners) <= 4


def test_cards_point_back_at_the_in_zone_name_and_lose_their_signatures() -> None:
    card = {"name": "r", "url": "http://127.0.0.1:4000/a2a?x=1",
            "supportedInterfaces": [{"url": "http://127.0.0.1:4000/", "protocolBinding": "JSONRPC"},
                                    {"url": "grpc://127.0.0.1:4001", "protocolBinding": "GRPC"}],
            "additionalInterfaces": [{"url": "https://10.0.0.1/v03", "transport": "JSONRPC"}],
            "signatures": [{"protected": "x", "signature": "y"}], "skills": []}
    out = json.loads(rewrite_card(json.dumps(card).encode(), "research.agents.local"))
    assert out["url"] == "http://research.agents.local/a2a?x=1"
    assert [i["url"] for i in out["supportedInterfaces"]] == ["http://research.agents.local/", "grpc://127.0.0.1:4001"]
    assert out["additionalInterfaces"][0]["url"] == "http://research.agents.local/v03"
    assert "signatures" not in out and out["name"] == "r"
    with pytest.raises(ValueError):
        rewrite_card(b"[]", "x")
    assert ids_in_body(b"nope") == (None, None)


@given(st.dictionaries(st.sampled_from(["jsonrpc", "method", "params", "id", "query"]),
                       st.one_of(st.just("2.0"), st.text(max_size=4), st.integers())),
       st.sampled_from(["utf-8", "utf-16", "utf-32"]), st.booleans())
def test_may_be_call_is_false_only_for_bodies_that_hold_no_call(document: dict, encoding: str, ascii: bool) -> None:
    """The proxy's cheap test (a body that is surely no call takes the fast path) never misses a call."""
    from sidecar.proxy.client import may_be_call

    body = json.dumps(document, ensure_ascii=ascii).encode(encoding)
    if read_call(body) is not None:
        assert may_be_call(bytearray(body))
    escaped = json.dumps(document).replace("jsonrpc", "json\\u0072pc").encode()
    if read_call(escaped) is not None:
        assert may_be_call(bytearray(escaped))
    assert not may_be_call(bytearray(b'{"query": "weather", "limit": 3}'))
