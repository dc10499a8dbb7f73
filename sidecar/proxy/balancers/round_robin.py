"""Smooth weighted round robin (nginx's): each agent in turn, in proportion to weight."""

from __future__ import annotations

from collections.abc import Sequence

from ...model import Agent
from . import PickContext


class RoundRobin:
    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[Agent], ctx: PickContext) -> Agent:
        """The candidate with the highest running credit; evenly interleaved by weight."""
        if len(candidates) == 1:
            return candidates[0]
        current = self._current
        if len(current) > 4 * len(candidates) + 16:
            # Agents that left keep no credit forever.
            live = {a.id for a in candidates}
            for gone in [i for i in current if i not in live]:
                del current[gone]
        # Weight 0 drains an agent, unless every candidate is drained.
        eligible = [a for a in candidates if a.weight > 0] or list(candidates)
        total = 0
        best = eligible[0]
        best_credit = None
        for agent in eligible:
            weight = agent.weight or 1
            credit = current.get(agent.id, 0) + weight
            current[agent.id] = credit
            total += weight
            if best_credit is None or credit > best_credit:
                best, best_credit = agent, credit
        current[best.id] -= total
        return best
