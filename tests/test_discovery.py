"""The shared query and the watch hub: order, filters, slow subscribers, resume and RELIST (no I/O)."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.catalog import Catalog, Delete, Reset, Upsert
from sidecar.discovery import Query, Update, WatchHub
from sidecar.model import parse_agent

pytestmark = pytest.mark.asyncio


def agent(agent_id: str, caps: list[str], tags: list[str] = (), status: str = "healthy", name: str = "svc"):
    return parse_agent({"id": agent_id, "name": name, "address": "127.0.0.1", "port": 80,
                        "capabilities": caps, "tags": list(tags), "health": {"status": status}})


def brief(update: Update) -> tuple[str, int, list[str]]:
    return update.kind.value, update.revision, [a.id for _, a in update.agents]


async def take(subscription, n: int) -> list[tuple[str, int, list[str]]]:
    return [brief(await asyncio.wait_for(anext(subscription), 1)) for _ in range(n)]


async def test_query_matches_what_select_selects() -> None:
    catalog = Catalog()
    snapshot = catalog.apply([Reset(1, {
        "/s/a": agent("a", ["chat"], ["gpu", "eu"]), "/s/b": agent("b", ["Chat"], ["eu"], status="unhealthy"),
        "/s/c": agent("c", ["code"], ["gpu"], name="other")})])
    for query in (Query.of("chat"), Query.of("CHAT", ["GPU"]), Query.of(tags=["eu,gpu"]), Query.of(name="other"),
                  Query.of(id="B"), Query.of("chat", healthy=True), Query.of(), Query.of("chat", name="other")):
        selected = sorted(a.id for a in query.select(snapshot))
        assert selected == sorted(a.id for a in snapshot.agents.values() if query.matches(a)), query
    assert [a.id for a in Query.of("chat", ["gpu"]).select(snapshot)] == ["a"]


async def test_snapshot_then_every_change_once_in_order() -> None:
    catalog = Catalog()
    catalog.apply([Reset(1, {"/s/a": agent("a", ["chat"])})])
    hub = WatchHub(catalog)
    sub = await hub.subscribe(Query.of("chat"))
    assert await take(sub, 1) == [("snapshot", 1, ["a"])]
    catalog.apply([Upsert("/s/b", agent("b", ["chat"]), 2), Upsert("/s/x", agent("x", ["code"]), 3)])
    catalog.apply([Delete("/s/a", 4)])
    catalog.apply([Upsert("/s/b", agent("b", ["code"]), 5)])  # leaves the filter
    catalog.apply([Delete("/s/x", 6)])  # never matched: nothing to say
    catalog.apply([Upsert("/s/c", agent("c", ["chat"]), 7)])
    assert await take(sub, 4) == [("upsert", 2, ["b"]), ("delete", 4, ["a"]), ("delete", 5, ["b"]),
                                  ("upsert", 7, ["c"])]
    sub.close()
    assert hub.subscribers == 0
    with pytest.raises(StopAsyncIteration):
        await anext(sub)


async def test_a_stalled_subscriber_gets_a_fresh_snapshot_and_never_holds_up_the_others() -> None:
    catalog = Catalog()
    catalog.apply([Reset(1, {})])
    lags: list[int] = []
    hub = WatchHub(catalog, queue_size=3, on_lag=lambda: lags.append(1))
    stalled = await hub.subscribe(Query.of())
    reader = await hub.subscribe(Query.of())
    assert await take(stalled, 1) == [("snapshot", 1, [])]
    assert await take(reader, 1) == [("snapshot", 1, [])]
    seen = []
    for i in range(2, 12):
        catalog.apply([Upsert(f"/s/a{i}", agent(f"a{i}", ["chat"]), i)])
        seen += await take(reader, 1)
    assert [rev for _, rev, _ in seen] == list(range(2, 12)), "the reader got every change, in order"
    assert lags and stalled.lagged == 1
    first = await take(stalled, 1)
    assert first == [("snapshot", 11, [f"a{i}" for i in range(2, 12)])]
    catalog.apply([Delete("/s/a2", 12)])
    assert await take(stalled, 1) == [("delete", 12, ["a2"])]


async def test_resume_replays_held_changes_and_relists_when_gone() -> None:
    catalog = Catalog()
    catalog.apply([Reset(10, {"/s/a": agent("a", ["chat"])})])
    compacted_below = 0

    async def compacted(revision: int) -> bool:
        return revision < compacted_below

    hub = WatchHub(catalog, compacted=compacted)
    catalog.apply([Upsert("/s/b", agent("b", ["chat"]), 11)])
    catalog.apply([Upsert("/s/b", agent("b", ["code"]), 12), Upsert("/s/c", agent("c", ["chat"]), 13)])
    resumed = await hub.subscribe(Query.of("chat"), from_revision=11)
    catalog.apply([Delete("/s/c", 14)])
    assert await take(resumed, 3) == [("delete", 12, ["b"]), ("upsert", 13, ["c"]), ("delete", 14, ["c"])]
    current = await hub.subscribe(Query.of("chat"), from_revision=14)
    catalog.apply([Upsert("/s/d", agent("d", ["chat"]), 15)])
    assert await take(current, 1) == [("upsert", 15, ["d"])]
    older = await hub.subscribe(Query.of("chat"), from_revision=5)  # before the hub's first list
    assert await take(older, 2) == [("relist", 15, []), ("snapshot", 15, ["a", "d"])]
    compacted_below = 14
    gone = await hub.subscribe(Query.of("chat"), from_revision=12)
    assert await take(gone, 2) == [("relist", 15, []), ("snapshot", 15, ["a", "d"])]


async def test_a_relist_of_the_catalog_resnapshots_every_subscriber() -> None:
    catalog = Catalog()
    catalog.apply([Reset(1, {"/s/a": agent("a", ["chat"])})])
    hub = WatchHub(catalog)
    sub = await hub.subscribe(Query.of("chat"))
    assert await take(sub, 1) == [("snapshot", 1, ["a"])]
    catalog.apply([Reset(9, {"/s/b": agent("b", ["chat"])})])
    assert await take(sub, 1) == [("snapshot", 9, ["b"])]
    before_relist = await hub.subscribe(Query.of(), from_revision=3)
    assert await take(before_relist, 2) == [("relist", 9, []), ("snapshot", 9, ["b"])]
