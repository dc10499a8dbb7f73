"""A breaker ticket: permission for one attempt. Its own module so that it is compiled with
the request path (setup.py) while the breakers (pybreaker) stay in Python: one is made per request."""

from __future__ import annotations


class Ticket:
    """Permission for one attempt to ``agent_id``; a trial when admitted half-open."""

    # A plain class, not a dataclass: mypyc gives a dataclass the generated Python __init__ (a Python
    # call per request); this one is native.
    __slots__ = ("agent_id", "done", "trial")

    def __init__(self, agent_id: str, trial: bool, done: bool = False) -> None:
        self.agent_id = agent_id
        self.trial = trial
        self.done = done

    def __repr__(self) -> str:
        return f"Ticket({self.agent_id!r}, trial={self.trial}, done={self.done})"
