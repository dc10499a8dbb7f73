"""Random choice in proportion to weight (the original design's default)."""

from __future__ import annotations

from collections.abc import Sequence

from ...model import Agent
from . import PickContext


class WeightedRandom:
    def pick(self, candidates: Sequence[Agent], ctx: PickContext) -> Agent:
        """A candidate drawn with probability weight/total; uniform when all weights are 0."""
        if len(candidates) == 1:
            return candidates[0]
        total = 0
        for agent in candidates:
            total += agent.weight
        if total <= 0:
            return candidates[int(ctx.rng.random() * len(candidates))]
        point = ctx.rng.random() * total
        for agent in candidates:
            point -= agent.weight
            if point < 0:
                return agent
        return candidates[-1]
