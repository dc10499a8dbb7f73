"""Helpers for proxy tests: agents, a catalog filled by hand, a controllable clock."""

from __future__ import annotations

from sidecar.catalog import Catalog, Reset
from sidecar.model import Agent, Health


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def agent(agent_id: str, port: int = 8000, *, weight: int = 100, zone: str = "",
          capabilities: tuple[str, ...] = ("chat",), tags: tuple[str, ...] = (), status: str = "healthy",
          name: str = "chatbot",
          address: str = "127.0.0.1") -> Agent:
    return Agent(id=agent_id, name=name, address=address, port=port, weight=weight, zone=zone,
                 capabilities=capabilities, tags=tags, health=Health(status=status))


def catalog_of(*agents: Agent, revision: int = 1) -> Catalog:
    catalog = Catalog()
    catalog.apply([Reset(revision, {f"/services/{a.name}/{a.id}": a for a in agents})])
    return catalog
