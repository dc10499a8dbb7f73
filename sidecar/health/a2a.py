"""A2A agent cards -> the local agent's record.

Both shapes are read: v1.0 (``supportedInterfaces[]`` of ``{url, protocolBinding,
protocolVersion}``) and v0.2/v0.3 (top-level ``url``, ``preferredTransport``,
``protocolVersion``). Skill ids become capabilities, skill tags become tags
(as DNS labels; the originals are kept in metadata), and name, version and
provider become metadata under ``a2a.``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ..errors import CardError
from ..model import label

WELL_KNOWN = ("/.well-known/agent-card.json", "/.well-known/agent.json")
MAX_CARD_BYTES = 1 << 20
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


def decode_card(raw: bytes, source: str) -> Card:
    """Parse card bytes (JSON) from ``source``; raises CardError."""
    if len(raw) > MAX_CARD_BYTES:
        raise CardError(source, f"is larger than {MAX_CARD_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CardError(source, f"is not valid JSON: {exc}") from None
    return parse_card(data, source)


async def load_card(source: str, timeout: float) -> Card:
    """The card at an http(s) URL or in a file; raises CardError (``missing`` for 404 or no file)."""
    if source.startswith(("http://", "https://")):
        return decode_card(await _fetch(source, timeout), source)
    path = source.removeprefix("file://")
    try:
        raw = await asyncio.to_thread(_read_file, path)
    except FileNotFoundError:
        raise CardError(source, "no such file", kind="missing") from None
    except OSError as exc:
        raise CardError(source, f"cannot read: {exc.strerror}") from None
    return decode_card(raw, source)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(MAX_CARD_BYTES + 1)


async def discover_card(port: int, timeout: float, host: str = "127.0.0.1") -> Card:
    """The card the agent serves at the well-known paths (agent-card.json, then the older agent.json).

    Raises CardError with ``missing`` set when neither path has one.
    """
    tried: list[str] = []
    for path in WELL_KNOWN:
        url = f"http://{host}:{port}{path}"
        try:
            return await load_card(url, timeout)
        except CardError as exc:
            if not exc.missing:
                raise
            tried.append(url)
    raise CardError(" and ".join(tried), "not found (HTTP 404)", kind="missing")


async def _fetch(url: str, timeout: float) -> bytes:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(url, allow_redirects=False, headers={"Accept": "application/json"}) as response:
                if response.status == 404:
                    raise CardError(url, "not found (HTTP 404)", kind="missing")
                if response.status != 200:
                    raise CardError(url, f"HTTP {response.status}")
                raw = await response.content.read(MAX_CARD_BYTES + 1)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise CardError(url, f"cannot fetch: {type(exc).__name__}: {exc}", kind="unreachable") from None
    return raw


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
