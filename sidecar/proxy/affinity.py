"""Sticky sessions: the same agent for a session while that agent stays usable.

Two ways to name a session: the ``X-Session-Id`` header (pins are remembered
here, per target, in an LRU that forgets a session idle for ``cookie_max_age``)
or the ``sidecar_affinity`` cookie, which carries the agent id itself, so it
survives restarts of this sidecar and is the same in every sidecar. A pin only
moves when its agent is gone or unusable, so scale-out never moves a session.
Pure: the clock is passed in.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from urllib.parse import quote, unquote

from ..config import StickySettings
from ..model import Agent

MAX_SESSIONS = 100_000


def cookie_value(header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header, or None."""
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


class Affinity:
    """Finds and records session pins."""

    def __init__(self, settings: StickySettings, clock: Callable[[], float] = time.monotonic,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self.settings = settings
        self._clock = clock
        self._max = max_sessions
        self._pins: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def update(self, settings: StickySettings) -> None:
        """Swap settings live; existing pins are kept."""
        self.settings = settings

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def find(self, target: str, session: str | None, cookie: str | None,
             usable: Sequence[Agent]) -> Agent | None:
        """The pinned agent of this request if it is among ``usable``, else None (re-pin)."""
        agent_id: str | None = None
        if session:
            entry = self._pins.get((target, session))
            if entry is not None:
                pinned, last = entry
                ttl = self.settings.cookie_max_age
                if ttl and self._clock() - last > ttl:
                    del self._pins[(target, session)]
                else:
                    agent_id = pinned
        elif cookie:
            agent_id = unquote(cookie)
        if agent_id is None:
            return None
        for agent in usable:
            if agent.id == agent_id:
                if session:
                    self._pins[(target, session)] = (agent_id, self._clock())
                    self._pins.move_to_end((target, session))
                return agent
        return None

    def pin(self, target: str, session: str | None, agent: Agent) -> None:
        """Remember ``agent`` for a header-named session (cookie sessions live in the cookie)."""
        if not session:
            return
        key = (target, session)
        self._pins[key] = (agent.id, self._clock())
        self._pins.move_to_end(key)
        while len(self._pins) > self._max:
            self._pins.popitem(last=False)

    def set_cookie(self, session: str | None, cookie: str | None, agent: Agent) -> str | None:
        """The ``Set-Cookie`` value to send, or None when the client already holds the right one.

        Header-named sessions get no cookie.
        """
        if session:
            return None
        value = quote(agent.id, safe="")
        if cookie == value or (cookie is not None and unquote(cookie) == agent.id):
            return None
        text = f"{self.settings.cookie}={value}; Path=/; HttpOnly"
        if self.settings.cookie_max_age:
            text += f"; Max-Age={int(self.settings.cookie_max_age)}"
        return text

    def __len__(self) -> int:
        return len(self._pins)
