"""The local agent's lifecycle: card -> first passing check -> register -> keep the
published health current -> on stop, drain (unhealthy), wait, revoke the lease.

A component of the server (``start``/``stop``). Re-registration after an etcd
outage longer than the TTL is the lease keeper's: it writes ``registration.agent``,
which this component keeps equal to the latest verdict.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..cards import Card, merge_card
from ..config import A2aSettings, AgentSettings, HealthCheckSettings
from ..errors import AgentExists, CardError, RegistryUnavailable, ValidationError
from ..metrics import HealthMetrics
from ..model import HEALTHY, LOAD_KEY, UNHEALTHY, Agent, new_agent_id, parse_agent
from ..registry.lease import LeaseKeeper, Registration
from ..tasks import cancel_and_wait
from . import a2a
from .active import ActiveChecker, Verdict
from .checks import HealthCheck, make, target

log = logging.getLogger(__name__)

LOADED_KEY = "health.loaded"
DRAINING_KEY = "health.draining"


def default_address(environ: Mapping[str, str]) -> str:
    """``POD_IP`` when set, else this host's address (loopback when it has none)."""
    pod_ip = environ.get("POD_IP", "").strip()
    if pod_ip:
        return pod_ip
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class LocalAgent:
    """Registers, checks and drains the agent next to this sidecar."""

    def __init__(self, settings: AgentSettings, checking: HealthCheckSettings, leases: LeaseKeeper,
                 metrics: HealthMetrics, environ: Mapping[str, str] | None = None,
                 a2a_settings: A2aSettings | None = None) -> None:
        self.settings = settings
        self.checking = checking
        self.a2a = a2a_settings or A2aSettings()
        self.leases = leases
        self.metrics = metrics
        self.environ = os.environ if environ is None else environ
        self.registration: Registration | None = None
        self.checker: ActiveChecker | None = None
        self.card: Card | None = None
        self.error = ""  # the last card or record problem, for readiness detail
        self._fields: dict[str, Any] = {}
        self._explicit: tuple[str, ...] = ()
        self._check: HealthCheck | None = None
        self._passed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._writing = asyncio.Lock()

    def describe(self) -> dict[str, Any]:
        """State for ``/readyz``: registered or not, the verdict, the last error."""
        verdict = self.checker.verdict if self.checker is not None else Verdict()
        out: dict[str, Any] = {"registered": self.registration is not None, "status": verdict.status}
        if self.registration is not None:
            out["id"] = self.registration.agent.id
        if self.error:
            out["error"] = self.error
        return out

    def update(self, checking: HealthCheckSettings, a2a: A2aSettings) -> None:
        """Hot-apply interval, timeout, thresholds, drain period and the card limits; the verdict is kept."""
        self.checking = checking
        self.a2a = a2a
        if self.checker is not None:
            self.checker.update(checking)

    async def start(self) -> None:
        """Begin the lifecycle in the background (the settings were validated in config.py)."""
        s = self.settings
        fields: dict[str, Any] = {
            "name": s.name or "agent", "id": s.id, "address": s.address or default_address(self.environ),
            "port": s.port, "version": s.version, "protocol": s.protocol, "capabilities": list(s.capabilities),
            "tags": list(s.tags), "metadata": dict(s.metadata), "weight": s.weight, "zone": s.zone,
            "ttl": f"{s.ttl}s",
        }
        self._fields = fields
        self._explicit = tuple(k for k, v in (("name", s.name), ("version", s.version), ("port", s.port),
                                              ("protocol", s.protocol != "http"), ("capabilities", s.capabilities))
                               if v)
        self._tasks.append(asyncio.get_running_loop().create_task(self._supervise(), name="local-agent"))

    async def stop(self) -> None:
        """Drain: publish unhealthy, wait ``drain_period`` so peers move away, revoke the lease."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            failure = await cancel_and_wait(task)
            if failure is not None:
                log.error("local agent task failed", exc_info=failure)
        self._tasks.clear()
        registration, self.registration = self.registration, None
        if registration is not None:
            draining = _with_verdict(registration.agent, Verdict(UNHEALTHY))
            draining = replace(draining, metadata={**draining.metadata, DRAINING_KEY: "true"})
            try:
                await registration.update(draining)
                self.metrics.status_writes.labels("ok").inc()
                log.info("local agent %s is draining for %gs", registration.agent.id, self.checking.drain_period)
                await asyncio.sleep(self.checking.drain_period)
            except RegistryUnavailable as exc:
                self.metrics.status_writes.labels("error").inc()
                log.warning("could not mark the local agent draining (%s); revoking its lease", exc)
            await registration.close()
            log.info("local agent %s deregistered", registration.agent.id)
        if self._check is not None:
            await self._check.close()
            self._check = None

    async def _supervise(self) -> None:
        """Run the lifecycle; an unexpected failure is logged and the lifecycle starts over."""
        while True:
            try:
                await self._lifecycle()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.error = f"local agent lifecycle failed: {type(exc).__name__}: {exc}"
                log.exception("local agent lifecycle failed; starting it over")
            for task in self._tasks[1:]:
                task.cancel()
            del self._tasks[1:]
            self.checker = None
            self._passed.clear()
            if self._check is not None:
                await self._check.close()
                self._check = None
            await asyncio.sleep(self.checking.interval)

    async def _lifecycle(self) -> None:
        s = self.settings
        fields = self._fields
        # A card that must supply the name or the port is waited for; otherwise it only adds to the flags and
        # is read once the agent answers its first check (a card that cannot be read or is refused then).
        if (s.card or not s.name) and not (s.name and s.port):
            self.card = await self._load_card_until_read()
            fields = merge_card(fields, self.card, self._explicit)
            if not fields["port"]:
                self.error = f"agent.port: not set, and the card's URL {self.card.url!r} names no port"
                log.error("local agent: %s", self.error)
                return
        kind = s.health.type
        url = target(kind, s.health.url, fields["address"], fields["port"])
        try:
            self._check = make(kind, url, self.checking.timeout)
        except ValueError as exc:
            self.error = f"agent.health.url: {exc}"
            log.error("local agent: %s", self.error)
            return
        fields["health"] = {"type": kind, "url": url, "interval": f"{self.checking.interval}s",
                            "timeout": f"{self.checking.timeout}s"}
        self.checker = ActiveChecker(self._check, kind, self.checking, self._changed, self.metrics)
        self._tasks.append(asyncio.get_running_loop().create_task(self.checker.run(), name="local-agent-check"))
        log.info("checking the local agent (%s %s) before registering it", kind, url)
        await self._passed.wait()
        if self.card is None and (s.card or not s.capabilities):
            try:
                self.card = await self._read_card(fields["port"])
                fields = merge_card(fields, self.card, self._explicit)
                log.info("read the local agent's A2A card: capabilities %s", ",".join(self.card.capabilities()))
            except CardError as exc:
                self.metrics.card_errors.labels(exc.kind).inc()
                if exc.missing and not s.card:
                    log.info("local agent serves no A2A card (%s); registering it from the flags", exc.source)
                else:
                    self.error = str(exc)
                    log.error("%s; registering the local agent from the flags, without its card", exc)
        # A StatefulSet pod keeps its name across restarts: its new record then replaces the old
        # one at once instead of standing beside it until the old lease expires.
        fields["id"] = fields["id"] or self.environ.get("POD_NAME", "").strip() or new_agent_id(fields["name"])
        try:
            agent = parse_agent(fields, strict=True)
        except ValidationError as exc:
            self.error = f"invalid local agent: {exc}"
            log.error("%s; not registering it", self.error)
            return
        await self._register(agent)
        if self.card is not None:
            await self._publish_card(self.card)
        source = self.card.source if self.card is not None else s.card
        if source.startswith(("http://", "https://")):
            # Kept current; a named card that could not be read is stored once it can.
            self._tasks.append(asyncio.get_running_loop().create_task(self._refresh_card(source), name="local-card"))

    async def _publish_card(self, card: Card) -> None:
        """Store the card beside the agent, on its lease (kept and rewritten by the lease keeper)."""
        registration = self.registration
        if registration is None or not card.raw:
            return
        try:
            await registration.attach_card(card.raw)
        except RegistryUnavailable as exc:
            log.warning("could not store the local agent's card now (%s); it is written when etcd is back", exc)

    async def _refresh_card(self, source: str) -> None:
        """Read the card at ``source`` again now and then (a conditional GET once one was read); store it and
        the record when it changed."""
        while True:
            await asyncio.sleep(max(self.a2a.card_refresh, self.checking.interval))
            card = self.card
            try:
                fresh = await a2a.load_card(source, self.checking.timeout * 2, limit=self.a2a.max_card_bytes,
                                            etag=card.etag if card is not None else "")
            except CardError as exc:
                self.metrics.card_errors.labels(exc.kind).inc()
                log.warning("could not read the local agent's card again: %s; %s", exc,
                            "keeping the last one" if card is not None else "the agent stays registered without it")
                continue
            if fresh is None or (card is not None and fresh.raw == card.raw):
                continue
            self.card = fresh
            self.error = ""
            log.info("the local agent's card %s; storing it", "changed" if card is not None else "could be read")
            await self._publish_card(fresh)
            async with self._writing:
                registration = self.registration
                if registration is None:
                    continue
                fields = merge_card(self._fields, fresh, self._explicit)
                record = replace(registration.agent, capabilities=tuple(fields["capabilities"]),
                                 tags=tuple(fields["tags"]), metadata={**registration.agent.metadata,
                                                                       **fresh.metadata()})
                if record != registration.agent:
                    try:
                        await registration.update(record)
                    except RegistryUnavailable as exc:
                        log.warning("could not store the local agent's new capabilities now (%s)", exc)

    async def _read_card(self, port: int) -> Card:
        """The card ``agent.card`` names, else the one the agent serves at the well-known paths."""
        timeout, limit = self.checking.timeout * 2, self.a2a.max_card_bytes
        if self.settings.card:
            return await a2a.read_card(self.settings.card, timeout, limit=limit)
        return await a2a.discover_card(port, timeout, limit=limit)

    async def _load_card_until_read(self) -> Card:
        """The card, read again every check interval until it can be (it supplies the name or the port)."""
        last = ""
        while True:
            try:
                card = await self._read_card(self.settings.port)
                self.error = ""
                return card
            except CardError as exc:
                self.metrics.card_errors.labels(exc.kind).inc()
                self.error = str(exc)
                if self.error != last:
                    needed = "name" if not self.settings.name else "port"
                    log.error("%s; the local agent is not registered until it can be read (it gives the agent's "
                              "%s; retrying)", exc, needed)
                    last = self.error
            await asyncio.sleep(self.checking.interval)

    async def _register(self, agent: Agent) -> None:
        warned = False
        while True:
            async with self._writing:
                assert self.checker is not None
                record = _with_verdict(agent, self.checker.verdict)
                try:
                    self.registration = await self.leases.register(record)
                    log.info("registered the local agent %s (%s:%d, %s)", record.id, record.address, record.port,
                             record.health.status)
                    return
                except (RegistryUnavailable, AgentExists) as exc:
                    # AgentExists: a crashed predecessor's record (same id) stands until its lease expires.
                    if not warned:
                        log.warning("cannot register the local agent yet: %s (retrying)", exc)
                        warned = True
            await asyncio.sleep(min(self.checking.interval, 1.0) * random.uniform(0.5, 1.0))

    async def _changed(self, verdict: Verdict) -> None:
        if verdict.status == HEALTHY:
            self._passed.set()
        async with self._writing:
            registration = self.registration
            if registration is None:
                return
            try:
                await registration.update(_with_verdict(registration.agent, verdict))
                self.metrics.status_writes.labels("ok").inc()
            except RegistryUnavailable as exc:
                # The lease keeper writes registration.agent (already updated) when etcd is back.
                self.metrics.status_writes.labels("error").inc()
                log.warning("could not write the local agent's status %s now (%s); it is written when etcd "
                            "is back", verdict.status, exc)


def _with_verdict(agent: Agent, verdict: Verdict) -> Agent:
    metadata = {k: v for k, v in agent.metadata.items() if k != LOADED_KEY}
    if verdict.loaded:
        metadata[LOADED_KEY] = "true"
    if verdict.load is not None:
        metadata[LOAD_KEY] = f"{verdict.load:.2f}"
    return replace(agent, metadata=metadata, health=replace(agent.health, status=verdict.status))

