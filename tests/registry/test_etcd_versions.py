"""Compare-and-swap, reads at a revision and key history on a real etcd."""

from __future__ import annotations

import pytest

from sidecar.errors import RevisionCompacted
from sidecar.registry.etcd import EtcdClient

from ..etcd_process import EtcdProcess

pytestmark = [pytest.mark.etcd, pytest.mark.asyncio]


async def test_put_if_is_a_compare_and_swap(etcd: EtcdProcess, prefix: str) -> None:
    client = EtcdClient([etcd.endpoint], timeout=3)
    key = f"{prefix}/config/sidecar"
    try:
        first = await client.put_if(key, b"1", 0)
        assert first is not None
        assert await client.put_if(key, b"again", 0) is None, "the key exists now"
        second = await client.put_if(key, b"2", first)
        assert second is not None and second > first
        assert await client.put_if(key, b"stale", first) is None, "a writer that read the old revision loses"
        stored = await client.get_at(key)
        assert stored is not None and stored.value == b"2" and stored.mod_revision == second
        old = await client.get_at(key, first)
        assert old is not None and old.value == b"1"
        assert [kv.value for kv in await client.history(key)] == [b"2", b"1"]
    finally:
        await client.close()


async def test_history_stops_at_the_compaction_point(private_etcd: EtcdProcess, prefix: str) -> None:
    client = EtcdClient([private_etcd.endpoint], timeout=3)
    key = f"{prefix}/k"
    try:
        revisions = [await client.put(key, str(i).encode()) for i in range(4)]
        private_etcd.ctl("compact", str(revisions[2]))
        assert [kv.value for kv in await client.history(key)] == [b"3", b"2"]
        with pytest.raises(RevisionCompacted):
            await client.get_at(key, revisions[0])
    finally:
        await client.close()
