"""Snapshots: indexes, incremental updates, subscribers."""

from __future__ import annotations

from sidecar.catalog import Catalog, Delete, Reset, Upsert
from sidecar.model import parse_agent


def agent(agent_id: str, caps: list[str], tags: list[str] = (), status: str = "healthy", name: str = "svc"):
    return parse_agent({"id": agent_id, "name": name, "address": "127.0.0.1", "port": 80,
                        "capabilities": caps, "tags": list(tags), "health": {"status": status}})


def test_reset_indexes_every_kind() -> None:
    catalog = Catalog()
    snap = catalog.apply([Reset(7, {"/s/svc/a": agent("a", ["chat", "Code"]), "/s/svc/b": agent("b", ["chat"])})])
    assert snap.revision == 7 and catalog.synced
    assert [a.id for a in snap.by_capability["chat"]] == ["a", "b"]
    assert [a.id for a in snap.by_capability["code"]] == ["a"]
    assert [a.id for a in snap.by_name["svc"]] == ["a", "b"]
    assert snap.by_id["b"][0].id == "b"


def test_incremental_updates_keep_old_snapshots_intact() -> None:
    catalog = Catalog()
    first = catalog.apply([Reset(1, {"/k/a": agent("a", ["chat"])})])
    second = catalog.apply([Upsert("/k/b", agent("b", ["chat", "search"]), 2),
                            Upsert("/k/a", agent("a", ["search"]), 3)])
    third = catalog.apply([Delete("/k/b", 4)])
    assert [a.id for a in first.by_capability["chat"]] == ["a"]
    assert [a.id for a in second.by_capability["chat"]] == ["b"]
    assert sorted(a.id for a in second.by_capability["search"]) == ["a", "b"]
    assert "chat" not in third.by_capability
    assert [a.id for a in third.by_capability["search"]] == ["a"]
    assert third.revision == 4 and len(third.agents) == 1


def test_select_filters() -> None:
    catalog = Catalog()
    snap = catalog.apply([Reset(1, {
        "/k/a": agent("a", ["chat"], ["gpu", "eu"]),
        "/k/b": agent("b", ["chat"], ["gpu"], status="unhealthy"),
        "/k/c": agent("c", ["chat"], ["cpu"], name="other"),
    })])
    assert [a.id for a in snap.select(capability="chat", tags=["gpu"])] == ["a", "b"]
    assert [a.id for a in snap.select(capability="chat", tags=["gpu"], healthy=True)] == ["a"]
    assert [a.id for a in snap.select(capability="chat", name="other")] == ["c"]
    assert [a.id for a in snap.select(tags=["eu"])] == ["a"]
    assert snap.select(capability="none") == ()


def test_subscribers_see_each_batch_and_failures_are_contained() -> None:
    catalog = Catalog()
    seen = []

    def broken(snapshot, events):
        raise RuntimeError("boom")

    catalog.subscribe(broken)
    unsubscribe = catalog.subscribe(lambda s, e: seen.append((s.revision, len(e))))
    catalog.apply([Reset(1, {})])
    catalog.apply([Upsert("/k/a", agent("a", ["x"]), 2), Delete("/k/a", 3)])
    unsubscribe()
    catalog.apply([Upsert("/k/a", agent("a", ["x"]), 4)])
    assert seen == [(1, 1), (3, 2)]


def test_a_reset_replaces_everything() -> None:
    catalog = Catalog()
    catalog.apply([Reset(1, {"/k/a": agent("a", ["x"])})])
    snap = catalog.apply([Reset(5, {"/k/b": agent("b", ["y"])})])
    assert set(snap.by_capability) == {"y"} and list(snap.agents) == ["/k/b"]


def test_views_shared_by_a_batch_that_changes_no_label_stay_frozen() -> None:
    # A batch touching no label reuses the previous views; the next change must copy, not mutate them.
    catalog = Catalog()
    first = catalog.apply([Reset(1, {"/k/a": agent("a", ["chat"], name="one")})])
    unchanged = catalog.apply([Delete("/k/missing", 2)])
    catalog.apply([Upsert("/k/b", agent("b", ["chat"], name="two"), 3), Delete("/k/a", 4)])
    for snap in (first, unchanged):
        assert sorted(snap.by_id) == ["a"] and sorted(snap.by_name) == ["one"]
        assert [a.id for a in snap.by_capability["chat"]] == ["a"]
    assert unchanged.revision == 2 and catalog.snapshot.revision == 4
    assert sorted(catalog.snapshot.by_id) == ["b"] and sorted(catalog.snapshot.by_name) == ["two"]
