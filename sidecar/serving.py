"""Which agents of a selection are served: the one policy DNS and the proxy share.

Healthy agents (status not ``unhealthy``), minus any a local filter refuses
(the proxy's outlier ejections). When that leaves none and ``panic`` is on,
every agent of the selection is served instead, as Envoy does below its panic
threshold: some traffic to possibly-bad agents beats certain failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .model import Agent


def servable(agents: Sequence[Agent], panic: bool = False,
             admitted: Callable[[Agent], bool] | None = None) -> Sequence[Agent]:
    """The agents to serve from ``agents``: healthy and admitted; all of them when none is and ``panic`` is on."""
    if admitted is None:
        chosen = [a for a in agents if a.healthy]
    else:
        chosen = [a for a in agents if a.healthy and admitted(a)]
    if chosen or not panic:
        return chosen
    return agents
