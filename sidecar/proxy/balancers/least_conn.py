"""Fewest requests in flight per unit of weight and of the capacity an agent says it has free; ties at random."""

from __future__ import annotations

from collections.abc import Sequence

from ...model import Agent
from . import PickContext


class LeastConn:
    def pick(self, candidates: Sequence[Agent], ctx: PickContext) -> Agent:
        """A candidate minimising (in_flight + 1) / weight / free, free = max(0.05, 1 - the agent's load)."""
        if len(candidates) == 1:
            return candidates[0]
        best: list[Agent] = []
        best_score = 0.0
        for agent in candidates:
            score = (ctx.loads.in_flight(agent.id) + 1) / max(agent.weight, 1)
            if agent.load:
                score /= max(0.05, 1.0 - agent.load)
            if not best or score < best_score:
                best, best_score = [agent], score
            elif score == best_score:
                best.append(agent)
        return best[0] if len(best) == 1 else best[int(ctx.rng.random() * len(best))]
