"""A2A agent cards: parsing both shapes, what a card adds to an agent record, and the card index.

Both shapes are read: v1.0 (``supportedInterfaces[]`` of ``{url, protocolBinding,
protocolVersion}``) and v0.2/v0.3 (top-level ``url``, ``preferredTransport``,
``protocolVersion``). Skill ids become capabilities, skill tags become tags
(as DNS labels; the originals are kept in metadata), and name, version and
provider become metadata under ``a2a.``. No I/O here: health/a2a.py fetches
cards, registry/cards.py stores and watches them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import CardError
from .model import label

WELL_KNOWN = ("/.well-known/agent-card.json", "/.well-known/agent.json")
# The default of ``a2a.max_card_bytes`` (config.py): cards larger than this are refused.
MAX_CARD_BYTES = 64 << 10
_RESERVED = frozenset(("service", "id"))


@dataclass(frozen=True, slots=True)
class Card:
    """What the sidecar takes from an agent card."""

    name: str
    version: str
    shape: str  # "1.0" or "0.3" (also 0.2)
    url: str  # the preferred interface's URL
    binding: str  # JSONRPC, GRPC, HTTP+JSON...
    protocol_version: str
    skills: tuple[str, ...]
    tags: tuple[str, ...]  # original spellings, in card order
    provider: str = ""
    provider_url: str = ""
    # The card as served (JSON bytes) and its HTTP ETag, for storing it and asking again cheaply.
    raw: bytes = field(default=b"", repr=False, compare=False)
    etag: str = field(default="", compare=False)
    source: str = field(default="", compare=False)  # the URL or file it was read from

    @property
    def port(self) -> int:
        """The preferred interface's explicit port, or 0."""
        try:
            return urlsplit(self.url).port or 0
        except ValueError:
            return 0

    def metadata(self) -> dict[str, str]:
        """The ``a2a.*`` metadata entries this card contributes."""
        out = {"a2a.name": self.name, "a2a.card": self.shape, "a2a.url": self.url}
        for key, value in (("a2a.version", self.version), ("a2a.binding", self.binding),
                           ("a2a.protocol_version", self.protocol_version), ("a2a.provider", self.provider),
                           ("a2a.provider_url", self.provider_url)):
            if value:
                out[key] = value
        if self.tags:
            out["a2a.tags"] = json.dumps(list(self.tags), ensure_ascii=False)
        return out

    def capabilities(self) -> tuple[str, ...]:
        """Skill ids usable as capabilities (the reserved DNS labels ``service`` and ``id`` are left out)."""
        return tuple(dict.fromkeys(s for s in self.skills if label(s) not in _RESERVED and len(label(s)) <= 63))

    def tag_labels(self) -> tuple[str, ...]:
        """Skill tags normalised to DNS labels, deduplicated."""
        return tuple(dict.fromkeys(label(t) for t in self.tags if t.strip() and len(label(t)) <= 63))


def parse_card(data: object, source: str) -> Card:
    """Validate a decoded card (either shape); raises CardError naming the first bad field."""
    if not isinstance(data, Mapping):
        raise CardError(source, "must be a JSON object")
    name = _string(data, "name", source, required=True)
    version = _string(data, "version", source)
    interfaces = data.get("supportedInterfaces")
    if interfaces is not None:
        if not isinstance(interfaces, list) or not interfaces:
            raise CardError(source, "supportedInterfaces must be a non-empty list")
        first = interfaces[0]
        if not isinstance(first, Mapping):
            raise CardError(source, "supportedInterfaces[0] must be an object")
        shape = "1.0"
        url = _string(first, "url", source, "supportedInterfaces[0].", required=True)
        binding = _string(first, "protocolBinding", source, "supportedInterfaces[0].")
        protocol_version = _string(first, "protocolVersion", source, "supportedInterfaces[0].")
    elif "url" in data:
        shape = "0.3"
        url = _string(data, "url", source, required=True)
        binding = _string(data, "preferredTransport", source) or "JSONRPC"
        protocol_version = _string(data, "protocolVersion", source)
    else:
        raise CardError(source, "has neither supportedInterfaces (v1.0) nor url (v0.2/v0.3)")
    if urlsplit(url).scheme not in ("http", "https", "grpc", "grpcs") or not urlsplit(url).hostname:
        raise CardError(source, f"interface url {url!r} is not an absolute URL")
    skills_raw = data.get("skills", [])
    if not isinstance(skills_raw, list):
        raise CardError(source, "skills must be a list")
    skills: list[str] = []
    tags: list[str] = []
    for i, skill in enumerate(skills_raw):
        if not isinstance(skill, Mapping):
            raise CardError(source, f"skills[{i}] must be an object")
        skills.append(_string(skill, "id", source, f"skills[{i}].", required=True))
        skill_tags = skill.get("tags", [])
        if not isinstance(skill_tags, list) or not all(isinstance(t, str) for t in skill_tags):
            raise CardError(source, f"skills[{i}].tags must be a list of strings")
        tags.extend(skill_tags)
    provider, provider_url = "", ""
    raw_provider = data.get("provider")
    if raw_provider is not None:
        if not isinstance(raw_provider, Mapping):
            raise CardError(source, "provider must be an object")
        provider = _string(raw_provider, "organization", source, "provider.")
        provider_url = _string(raw_provider, "url", source, "provider.")
    return Card(name=name, version=version, shape=shape, url=url, binding=binding,
                protocol_version=protocol_version, skills=tuple(skills), tags=tuple(dict.fromkeys(tags)),
                provider=provider, provider_url=provider_url)


def _string(data: Mapping[str, Any], key: str, source: str, path: str = "", required: bool = False) -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise CardError(source, f"{path}{key} is missing")
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise CardError(source, f"{path}{key} must be a non-empty string, got {value!r}")
    return value


def decode_card(raw: bytes, source: str, *, etag: str = "", limit: int = MAX_CARD_BYTES) -> Card:
    """Parse card bytes (JSON) from ``source``; raises CardError (``too_large`` beyond ``limit`` bytes)."""
    if len(raw) > limit:
        raise CardError(source, f"is larger than {limit} bytes", kind="too_large")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CardError(source, f"is not valid JSON: {exc}") from None
    card = parse_card(data, source)
    return Card(**{f: getattr(card, f) for f in card.__dataclass_fields__ if f not in ("raw", "etag", "source")},
                raw=bytes(raw), etag=etag, source=source)


def merge_card(fields: Mapping[str, Any], card: Card, explicit: Sequence[str]) -> dict[str, Any]:
    """The agent JSON ``fields`` with what ``card`` adds; keys in ``explicit`` (set by flags) are kept as given."""
    out = dict(fields)
    if "name" not in explicit:
        out["name"] = label(card.name).strip("-")[:63] or "agent"
    if "version" not in explicit and card.version:
        out["version"] = card.version
    if "port" not in explicit and card.port:
        out["port"] = card.port
    if "protocol" not in explicit and card.binding.upper() == "GRPC":
        out["protocol"] = "grpc"
    if "capabilities" not in explicit:
        out["capabilities"] = list(card.capabilities())
    out["tags"] = list(dict.fromkeys([*out.get("tags", []), *card.tag_labels()]))
    out["metadata"] = {**card.metadata(), **out.get("metadata", {})}
    return out


def card_key(prefix: str, name: str, agent_id: str) -> str:
    """The etcd key of an agent's card (it lives on the agent's lease)."""
    return f"{prefix}/cards/{name}/{agent_id}"


@dataclass(frozen=True, slots=True)
class StoredCard:
    """A card as the registry holds it: whose it is, the parsed card (with its bytes), its revision."""

    key: str
    name: str
    agent_id: str
    card: Card
    revision: int

    @property
    def owner(self) -> str:
        """``name/id``: the agent this card belongs to (the tail of its etcd key)."""
        return f"{self.name}/{self.agent_id}"


class CardIndex:
    """The cards every sidecar holds: an immutable mapping ``name/id -> StoredCard``, replaced per batch."""

    def __init__(self) -> None:
        self.cards: Mapping[str, StoredCard] = {}
        self.revision = 0

    def replace(self, cards: Mapping[str, StoredCard], revision: int) -> None:
        """Publish a new mapping (never mutated after this)."""
        self.cards = cards
        self.revision = max(self.revision, revision)

    def of(self, name: str, agent_id: str) -> StoredCard | None:
        """The card of one agent, if it published one."""
        return self.cards.get(f"{name}/{agent_id}")
