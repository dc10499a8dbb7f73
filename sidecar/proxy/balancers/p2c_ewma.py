"""Power of two choices on peak-EWMA latency x (in-flight + 1) (Linkerd's balancer)."""

from __future__ import annotations

from collections.abc import Sequence

from ...model import Agent
from . import PickContext


class P2cEwma:
    def pick(self, candidates: Sequence[Agent], ctx: PickContext) -> Agent:
        """The cheaper of two distinct random candidates; cost = rtt estimate x (in_flight + 1) / free,
        free = max(0.05, 1 - the agent's published load)."""
        count = len(candidates)
        if count == 1:
            return candidates[0]
        first = int(ctx.rng.random() * count)
        second = int(ctx.rng.random() * (count - 1))
        if second >= first:
            second += 1
        a, b = candidates[first], candidates[second]
        loads, now = ctx.loads, ctx.now
        cost_a = loads.rtt(a.id, now) * (loads.in_flight(a.id) + 1)
        cost_b = loads.rtt(b.id, now) * (loads.in_flight(b.id) + 1)
        if a.load:
            cost_a /= max(0.05, 1.0 - a.load)
        if b.load:
            cost_b /= max(0.05, 1.0 - b.load)
        return b if cost_b < cost_a else a
