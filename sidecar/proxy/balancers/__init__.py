"""Load balancers: pure ``pick(candidates, ctx)``, chosen by name.

File, class and config value are one word: ``round_robin.py`` / ``RoundRobin`` /
``"round_robin"``. Candidates are already filtered (healthy, breaker not open,
under their concurrency limit) and ordered by etcd key; a balancer only chooses.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ...model import Agent
from ..load import LoadTable


@dataclass(slots=True)
class PickContext:
    """What a pick may look at besides the candidates: randomness, time, load, a hash key."""

    rng: random.Random
    now: float
    loads: LoadTable
    key: str | None = None


class Balancer(Protocol):
    def pick(self, candidates: Sequence[Agent], ctx: PickContext) -> Agent:
        """Choose one of ``candidates`` (never empty)."""
        ...


def prefer_zone(candidates: Sequence[Agent], zone: str) -> Sequence[Agent]:
    """The candidates in ``zone`` when there are any (and a zone is given), else all of them."""
    if not zone:
        return candidates
    return [a for a in candidates if a.zone == zone] or candidates


def skip_drained(candidates: Sequence[Agent]) -> Sequence[Agent]:
    """The candidates with a weight above 0, unless all have weight 0 (weight 0 drains an agent)."""
    for agent in candidates:
        if not agent.weight:
            return [a for a in candidates if a.weight] or candidates
    return candidates


def narrow(candidates: Sequence[Agent], zone: str = "") -> Sequence[Agent]:
    """What every balancer chooses among: the local zone's candidates if preferred and any, not drained."""
    return skip_drained(prefer_zone(candidates, zone))


class ZonePreferring:
    """Pick among same-zone candidates when there are any, else among all."""

    def __init__(self, inner: Balancer, zone: str) -> None:
        self.inner = inner
        self.zone = zone

    def pick(self, candidates: Sequence[Agent], ctx: PickContext) -> Agent:
        """Delegate to the inner balancer with the local zone's candidates, if any."""
        return self.inner.pick(prefer_zone(candidates, self.zone), ctx)


class SkippingDrained:
    """Weight 0 drains an agent under every algorithm: it is picked only when all candidates have weight 0."""

    def __init__(self, inner: Balancer) -> None:
        self.inner = inner

    def pick(self, candidates: Sequence[Agent], ctx: PickContext) -> Agent:
        """Delegate to the inner balancer without the weight-0 candidates, if any others remain."""
        return self.inner.pick(skip_drained(candidates), ctx)


def _registry() -> dict[str, Callable[[], Balancer]]:
    from .consistent_hash import ConsistentHash
    from .least_conn import LeastConn
    from .p2c_ewma import P2cEwma
    from .round_robin import RoundRobin
    from .weighted_random import WeightedRandom

    return {
        "round_robin": RoundRobin,
        "weighted_random": WeightedRandom,
        "least_conn": LeastConn,
        "consistent_hash": ConsistentHash,
        "p2c_ewma": P2cEwma,
    }


def make(name: str, zone: str = "") -> Balancer:
    """A fresh balancer called ``name`` that skips drained agents, zone-preferring when ``zone`` is given.

    Raises KeyError for an unknown name (settings validation rejects those first).
    """
    balancer: Balancer = SkippingDrained(make_bare(name))
    return ZonePreferring(balancer, zone) if zone else balancer


def make_bare(name: str) -> Balancer:
    """A fresh balancer called ``name`` that picks among exactly the candidates it gets (see ``narrow``)."""
    return _registry()[name]()


def names() -> tuple[str, ...]:
    """Every balancer name, in registry order."""
    return tuple(_registry())
