"""Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2017).

A key maps to a point on a ring of virtual nodes (more for heavier agents); the
first agent clockwise whose in-flight count is under ``load_factor`` x its fair
share takes it, so one hot key cannot melt one agent. Hashes are blake2b, so
every sidecar maps a key to the same agent. Without a key: weighted random.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence

from ...model import Agent
from . import PickContext
from .weighted_random import WeightedRandom

VNODES_PER_100_WEIGHT = 100
LOAD_FACTOR = 1.25
_RING_CACHE = 16


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class _Ring:
    def __init__(self, candidates: Sequence[Agent]) -> None:
        points: list[tuple[int, int]] = []
        for index, agent in enumerate(candidates):
            vnodes = max(1, min(1000, round(VNODES_PER_100_WEIGHT * max(agent.weight, 1) / 100)))
            points.extend((_hash(f"{agent.id}#{v}"), index) for v in range(vnodes))
        points.sort()
        self.hashes = [h for h, _ in points]
        self.owners = [i for _, i in points]


class ConsistentHash:
    def __init__(self, load_factor: float = LOAD_FACTOR) -> None:
        self.load_factor = load_factor
        self._rings: dict[tuple[tuple[str, int], ...], _Ring] = {}
        self._fallback = WeightedRandom()

    def pick(self, candidates: Sequence[Agent], ctx: PickContext) -> Agent:
        """The key's agent on the ring, skipping agents above their bounded share of load."""
        if ctx.key is None:
            return self._fallback.pick(candidates, ctx)
        if len(candidates) == 1:
            return candidates[0]
        ring = self._ring(candidates)
        loads = ctx.loads
        in_flight = [loads.in_flight(a.id) for a in candidates]
        total_weight = sum(max(a.weight, 1) for a in candidates)
        # Fair share of the requests in flight including this one, scaled by weight.
        share = self.load_factor * (sum(in_flight) + 1) / total_weight
        start = bisect.bisect(ring.hashes, _hash(ctx.key))
        seen: set[int] = set()
        size = len(ring.owners)
        for step in range(size):
            index = ring.owners[(start + step) % size]
            if index in seen:
                continue
            seen.add(index)
            if in_flight[index] + 1 <= math.ceil(share * max(candidates[index].weight, 1)):
                return candidates[index]
            if len(seen) == len(candidates):
                break
        return candidates[min(range(len(candidates)), key=in_flight.__getitem__)]

    def _ring(self, candidates: Sequence[Agent]) -> _Ring:
        signature = tuple((a.id, a.weight) for a in candidates)
        ring = self._rings.get(signature)
        if ring is None:
            if len(self._rings) >= _RING_CACHE:
                self._rings.pop(next(iter(self._rings)))
            ring = self._rings[signature] = _Ring(candidates)
        return ring
