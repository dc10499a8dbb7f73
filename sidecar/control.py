"""Registering and deregistering agents through this sidecar: the one logic the admin API and gRPC share."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .catalog import Catalog
from .config import RegistrySettings
from .errors import FieldError, ValidationError
from .model import Agent, new_agent_id, parse_agent
from .registry.etcd import EtcdClient
from .registry.lease import LeaseKeeper, Registration

log = logging.getLogger(__name__)


class Control:
    """Registrations made on behalf of clients, kept alive by this sidecar's leases."""

    def __init__(self, leases: LeaseKeeper, etcd: EtcdClient, catalog: Catalog, default_ttl: float) -> None:
        self._leases = leases
        self._etcd = etcd
        self._catalog = catalog
        self.default_ttl = default_ttl

    def update(self, registry: RegistrySettings) -> None:
        """Hot-apply ``registry.default_ttl`` for the next registrations (the current leases keep theirs)."""
        self.default_ttl = registry.default_ttl

    def parse(self, data: object) -> Agent:
        """An agent from a client's JSON; ``id`` defaults to ``<name>-<random>``, ``ttl`` to the registry's."""
        if not isinstance(data, Mapping):
            raise ValidationError([FieldError("<body>", data, "must be a JSON object")])
        body: dict[str, Any] = dict(data)
        if not body.get("id") and isinstance(body.get("name"), str):
            body["id"] = new_agent_id(body["name"])
        agent = parse_agent(body, strict=True, default_ttl=self.default_ttl)
        if "ttl" not in body:
            agent = replace(agent, ttl=self.default_ttl)
        if not agent.capabilities:
            log.info("agent %s registered without capabilities: only <name>.service and <id>.id find it", agent.id)
        return agent

    async def register(self, data: object) -> Registration:
        """Validate and register; raises ValidationError or AgentExists.

        When etcd cannot be reached the registration is kept pending (``registration.pending``)
        and written by the lease keeper as soon as etcd answers.
        """
        return await self._leases.register(self.parse(data), keep_pending=True)

    async def deregister(self, agent_id: str) -> bool:
        """Revoke our registrations of ``agent_id`` (cancel a pending one), or delete its keys;
        False when no such agent exists."""
        owned = self._leases.owned(agent_id)
        if owned:
            for registration in owned:
                await registration.close()
            return True
        found = [k for k, a in self._catalog.snapshot.agents.items() if a.id == agent_id]
        for key in found:
            await self._etcd.delete(key)
        return bool(found)
