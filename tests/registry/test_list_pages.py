"""The paged list (EtcdClient.list_pages) and a PrefixWatch relisting through it, on a real etcd.

Every page is read at the first page's revision, so the pages make the list of one moment even
when keys are written, changed and deleted between two pages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from sidecar.errors import RevisionCompacted
from sidecar.registry import channel
from sidecar.registry.etcd import EtcdClient, KeyValue
from sidecar.registry.watch import Change, Listed, PrefixWatch, Put

from ..etcd_process import EtcdProcess
from ..waiting import eventually

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]


async def put_all(client: EtcdClient, prefix: str, count: int, value: bytes = b"v") -> None:
    for i in range(count):
        await client.put(f"{prefix}/k{i:03d}", value + str(i).encode())


def flat(kvs: Sequence[KeyValue]) -> list[tuple[str, bytes, int]]:
    return [(kv.key, kv.value, kv.mod_revision) for kv in kvs]


async def test_pages_make_the_same_list_as_one_range(etcd: EtcdProcess, prefix: str) -> None:
    client = EtcdClient([etcd.endpoint], timeout=5)
    try:
        await put_all(client, prefix, 25)
        await client.put(prefix + "-sibling/x", b"not under the prefix /")
        revision, whole = await client.get_prefix(prefix + "/")
        pages = [page async for page in client.list_pages(prefix + "/", page_size=4)]
        assert [len(kvs) for _, kvs in pages] == [4, 4, 4, 4, 4, 4, 1]
        assert {page_revision for page_revision, _ in pages} == {revision}
        assert flat([kv for _, kvs in pages for kv in kvs]) == flat(whole)
        # A page size that divides the count ends without an empty page after the last one; an empty
        # prefix is one empty page at the current revision.
        assert [len(kvs) async for _, kvs in client.list_pages(prefix + "/", page_size=5)] == [5] * 5
        assert [(r, kvs) async for r, kvs in client.list_pages(prefix + "/none/", page_size=5)] == [(revision, [])]
    finally:
        await client.close()


async def test_writes_between_pages_do_not_show_in_the_list(etcd: EtcdProcess, prefix: str) -> None:
    client = EtcdClient([etcd.endpoint], timeout=5)
    try:
        await put_all(client, prefix, 10)
        revision, before = await client.get_prefix(prefix + "/")
        pages = client.list_pages(prefix + "/", page_size=3)
        first_revision, seen = await anext(pages)
        assert first_revision == revision and [kv.key for kv in seen] == [f"{prefix}/k{i:03d}" for i in range(3)]
        # Between pages: a key before the cursor and one after it are added, an unread key is changed,
        # another deleted.
        await client.put(f"{prefix}/k000a", b"new, before the cursor")
        await client.put(f"{prefix}/k005a", b"new, after the cursor")
        await client.put(f"{prefix}/k006", b"changed")
        assert await client.delete(f"{prefix}/k008")
        async for page_revision, kvs in pages:
            assert page_revision == revision
            seen += kvs
        assert flat(seen) == flat(before)
        # The list is of the first page's revision, so a watch from revision + 1 gets the four changes.
        stream = await client.watch_prefix(prefix + "/", revision + 1)
        try:
            events: list[tuple[bool, str]] = []
            while len(events) < 4:
                events += [(e.deleted, e.key) for e in await asyncio.wait_for(anext(stream), 10)]
        finally:
            await stream.close()
        assert events == [(False, f"{prefix}/k000a"), (False, f"{prefix}/k005a"), (False, f"{prefix}/k006"),
                          (True, f"{prefix}/k008")]
    finally:
        await client.close()


async def test_a_compaction_between_pages_fails_the_list(private_etcd: EtcdProcess, prefix: str) -> None:
    client = EtcdClient([private_etcd.endpoint], timeout=5)
    try:
        await put_all(client, prefix, 6)
        pages = client.list_pages(prefix + "/", page_size=2)
        revision, _ = await anext(pages)
        await client.put(prefix + "/later", b"x")
        private_etcd.ctl("compact", str(revision + 1))
        with pytest.raises(RevisionCompacted):
            async for _ in pages:
                pass
    finally:
        await client.close()


async def test_a_page_too_big_for_a_grpc_message_is_asked_again_smaller(
        etcd: EtcdProcess, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A client that takes messages of 64 KiB at most; 12 values of 16 KiB; pages of 10 asked.
    monkeypatch.setitem(channel.CHANNEL_OPTIONS, "grpc.max_receive_message_length", 64 * 1024)
    client = EtcdClient([etcd.endpoint], timeout=5)
    try:
        await put_all(client, prefix, 12, value=b"x" * 16 * 1024)
        pages = [kvs async for _, kvs in client.list_pages(prefix + "/", page_size=10)]
        assert max(len(kvs) for kvs in pages) <= 3  # halved from 10 to 5, then 2
        assert [kv.key for kvs in pages for kv in kvs] == [f"{prefix}/k{i:03d}" for i in range(12)]
    finally:
        await client.close()


async def test_a_prefix_watch_relists_through_small_pages(etcd: EtcdProcess, prefix: str) -> None:
    client = EtcdClient([etcd.endpoint], timeout=5)
    batches: list[Sequence[Change[str]]] = []
    watch: PrefixWatch[str] = PrefixWatch(client, prefix + "/", lambda key, raw: raw.decode(), batches.append,
                                          name="paged", page_size=3)
    try:
        await put_all(client, prefix, 8)
        revision, whole = await client.get_prefix(prefix + "/")
        await watch.start()
        await asyncio.wait_for(watch.synced.wait(), 20)
        listed = batches[0][0]
        assert isinstance(listed, Listed) and listed.revision == revision
        assert dict(listed.items) == {kv.key: kv.value.decode() for kv in whole}
        assert dict(listed.mod_revisions) == {kv.key: kv.mod_revision for kv in whole}
        await client.put(prefix + "/k100", b"after")
        await eventually(lambda: any(isinstance(c, Put) and c.key == prefix + "/k100" for b in batches for c in b),
                         timeout=20, what="the put after the list")
    finally:
        await watch.stop()
        await client.close()
