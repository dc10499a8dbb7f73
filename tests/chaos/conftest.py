"""Fixtures of the chaos suite: a real 3-member etcd cluster, a fresh one per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..etcd_cluster import EtcdCluster


@pytest.fixture
def cluster() -> Iterator[EtcdCluster]:
    members = EtcdCluster(3)
    members.start()
    yield members
    members.cleanup()
