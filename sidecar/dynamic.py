"""The dynamic configuration: a document in etcd, validated, versioned, applied without restart.

The document at ``{prefix}/config/sidecar`` is JSON with the settings'
sections at its top level. Its version is its etcd mod revision. Every
sidecar watches it; a valid document is laid over the sidecar's own settings
(document > flag > env > file > default, for the keys it sets; never over an
earlier version, so the keys a version leaves out fall back) and handed to
``apply(old, new)``; keys that are only read at start are
reported as needing a restart. An invalid document is rejected with the key
and value named, and the last good configuration stays in force.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from .config import Settings, build, changes, merge, to_document
from .errors import ConfigConflict, ConfigError, RegistryUnavailable, RevisionCompacted
from .metrics import ConfigMetrics
from .registry.etcd import EtcdClient
from .registry.watch import Change, Listed, PrefixWatch, Put

log = logging.getLogger(__name__)

# Sections that belong to one sidecar, never to the cluster-wide document.
PER_SIDECAR = ("etcd", "agent")
_SECRETS = (("etcd", "password"), ("admin", "token"))


def config_key(prefix: str) -> str:
    """The etcd key of the dynamic configuration document."""
    return f"{prefix}/config/sidecar"


def parse_document(raw: bytes | str, source: str = "document") -> dict[str, Any]:
    """A document's JSON as a mapping; ConfigError naming ``source`` when it is not one."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(source, raw[:80] if isinstance(raw, str) else raw[:80].decode(errors="replace"),
                          f"not valid JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(source, data, "must be a JSON object with the settings' sections at top level")
    return dict(data)


def validate_document(document: Mapping[str, Any], base: Settings | None = None) -> Settings:
    """The settings ``document`` gives over ``base`` (defaults when None); ConfigError naming the bad key."""
    if not isinstance(document, Mapping):
        raise ConfigError("<document>", document, "must be a mapping with the settings' sections at top level")
    for section in PER_SIDECAR:
        if section in document:
            raise ConfigError(section, document[section],
                              "is per sidecar: set it in the file, env or flags, not in the shared document")
    layered = merge(to_document(base or Settings()), document)
    return build(Settings, layered)


def _restart_free(document: Mapping[str, Any], schema: Any) -> dict[str, Any]:
    # The document without the keys only read at start (they wait for a restart).
    out: dict[str, Any] = {}
    known = {f.name: f for f in fields(schema)}
    for key, value in document.items():
        f = known.get(key)
        if f is None or f.metadata.get("restart"):
            continue
        section = getattr(schema, key)
        if is_dataclass(section) and isinstance(value, Mapping):
            out[key] = _restart_free(value, section)
        else:
            out[key] = value
    return out


def redacted(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with secrets replaced by ``"***"`` (when set)."""
    for section, key in _SECRETS:
        if document.get(section, {}).get(key):
            document[section][key] = "***"
    return document


async def read_stored(etcd: EtcdClient, prefix: str) -> tuple[int, bytes | None]:
    """(version, raw value) as stored now, parsed or not; (0, None) when there is none."""
    kv = await etcd.get_at(config_key(prefix))
    return (0, None) if kv is None else (kv.mod_revision, kv.value)


async def read_document(etcd: EtcdClient, prefix: str) -> tuple[int, dict[str, Any] | None]:
    """(version, document) as stored now; (0, None) when there is none; ConfigError when it is not JSON."""
    version, raw = await read_stored(etcd, prefix)
    return version, None if raw is None else parse_document(raw, config_key(prefix))


async def write_document(etcd: EtcdClient, prefix: str, document: Mapping[str, Any], expected: int) -> int:
    """Validate and store ``document`` if the stored version is still ``expected`` (0: none stored).

    Returns the new version; ConfigError when it does not validate, ConfigConflict
    when another writer got there first.
    """
    validate_document(document)
    body = json.dumps(document, indent=2, sort_keys=True).encode()
    written = await etcd.put_if(config_key(prefix), body, expected)
    if written is None:
        current = await etcd.get_at(config_key(prefix))
        raise ConfigConflict(expected, current.mod_revision if current is not None else 0)
    return written


async def document_history(etcd: EtcdClient, prefix: str, limit: int = 50) -> list[dict[str, Any]]:
    """Stored versions, newest first, as far back as etcd's compaction keeps them."""
    versions = []
    for kv in await etcd.history(config_key(prefix), limit):
        entry: dict[str, Any] = {"version": kv.mod_revision}
        try:
            entry["document"] = parse_document(kv.value)
            validate_document(entry["document"])
            entry["valid"] = True
        except ConfigError as exc:
            entry.update(valid=False, error=str(exc), raw=kv.value.decode(errors="replace"))
        versions.append(entry)
    return versions


async def document_at(etcd: EtcdClient, prefix: str, version: int) -> dict[str, Any]:
    """The document as it was at ``version``; ConfigError when that version is gone or was no document."""
    try:
        kv = await etcd.get_at(config_key(prefix), version)
    except RevisionCompacted:
        raise ConfigError("version", version, "is older than what etcd keeps (compacted)") from None
    if kv is None or kv.mod_revision != version:
        raise ConfigError("version", version, "is not a version of the configuration document")
    return parse_document(kv.value, f"version {version}")


@dataclass(frozen=True, slots=True)
class Starting:
    """The stored document a sidecar starts with: its version, the document and what it gives over the base."""

    version: int
    document: dict[str, Any]
    settings: Settings


async def starting_document(base: Settings, etcd: EtcdClient) -> Starting | None:
    """The stored document over ``base``, read once at start (restart-only keys included); None without one."""
    try:
        version, document = await read_document(etcd, base.etcd.prefix)
    except (RegistryUnavailable, ConfigError) as exc:
        log.warning("starting without the dynamic configuration (%s); it is applied once it can be read", exc)
        return None
    if document is None:
        return None
    try:
        layered = validate_document(document, base)
    except ConfigError as exc:
        log.error("the dynamic configuration version %d is invalid, starting without it: %s", version, exc)
        return None
    log.info("starting with the dynamic configuration version %d", version)
    return Starting(version, document, layered)


@dataclass(frozen=True, slots=True)
class _Stored:
    raw: bytes


Apply = Callable[[Settings, Settings], None]


class ConfigStore:
    """Follows the document in etcd and applies each valid version through ``apply(old, new)``."""

    def __init__(self, etcd: EtcdClient, base: Settings, apply: Apply, metrics: ConfigMetrics,
                 starting: Starting | None = None) -> None:
        """``base``: what flags, env and the file say; ``starting``: the document the process started with.

        Every version (and a deleted document) is laid over ``base``, never over an earlier version, so
        the keys a version leaves out fall back to file > default.
        """
        self._etcd = etcd
        self.prefix = base.etcd.prefix
        self.key = config_key(self.prefix)
        self._base = base
        self.running = base if starting is None else starting.settings
        self._apply = apply
        self._metrics = metrics
        self.version = 0 if starting is None else starting.version
        # The version last seen stored, valid or not (0: none): what a write without If-Match replaces.
        self.seen = self.version
        self.document: dict[str, Any] | None = None if starting is None else dict(starting.document)
        self.error: dict[str, Any] | None = None
        self.needs_restart: list[str] = []
        self.applied_at: float | None = None if starting is None else time.time()
        self.watch: PrefixWatch[_Stored] = PrefixWatch(etcd, self.key, self._decode, self._on_changes,
                                                       name="config")
        metrics.version.set_function(lambda: self.version)
        metrics.needs_restart.set_function(lambda: len(self.needs_restart))

    async def start(self) -> None:
        await self.watch.start()

    async def stop(self) -> None:
        await self.watch.stop()

    def _decode(self, key: str, value: bytes) -> _Stored | None:
        return _Stored(value) if key == self.key else None

    def _on_changes(self, batch: Sequence[Change[_Stored]]) -> None:
        for change in batch:
            if isinstance(change, Listed):
                stored = change.items.get(self.key)
                # The version is the key's own mod revision, not the revision the list was read at.
                self._take(None if stored is None else (stored.raw, change.mod_revisions[self.key]))
            elif change.key == self.key:
                self._take((change.value.raw, change.revision) if isinstance(change, Put) else None)

    def _take(self, stored: tuple[bytes, int] | None) -> None:
        if stored is None:
            self.seen = 0
            self.reload(self._base, {}, 0)
            return
        raw, version = stored
        self.seen = max(self.seen, version)
        if version < self.version or (version == self.version and self.error is None and self.document is not None):
            return  # already in force (a relist), or older than what is
        try:
            document = parse_document(raw, self.key)
        except ConfigError as exc:
            self._reject(version, exc)
            return
        self.reload(self._base, document, version)

    def reload(self, base: Settings, document: Mapping[str, Any] | None = None, version: int | None = None) -> None:
        """Lay ``document`` (default: the current one) over ``base`` and apply the result.

        Used for each new version of the document and for SIGHUP (a re-read file is a new base).
        """
        document = dict(self.document or {}) if document is None else dict(document)
        version = self.version if version is None else version
        try:
            wanted = validate_document(document, base)
            live = validate_document(_restart_free(document, Settings()), self._with_running_restart_keys(base))
        except ConfigError as exc:
            self._reject(version, exc)
            return
        self._base = base
        old, self.running = self.running, live
        self.version, self.document, self.error = version, document or None, None
        self.needs_restart = sorted(key for key, restart in changes(self.running, wanted) if restart)
        if self.needs_restart:
            log.warning("configuration version %d: %s only change at a restart", version,
                        ", ".join(self.needs_restart))
        if old != live:
            self._apply(old, live)
            log.info("applied configuration version %d: %s", version,
                     ", ".join(k for k, _ in changes(old, live)) or "no change")
        self.applied_at = time.time()
        self._metrics.applies.labels("applied").inc()

    def _with_running_restart_keys(self, base: Settings) -> Settings:
        # base, but with what cannot change at run time as it runs now.
        running = to_document(self.running)
        out = to_document(base)
        for key, restart in changes(self.running, base):
            if restart:
                node_out, node_run = out, running
                *parents, last = key.split(".")
                for part in parents:
                    node_out, node_run = node_out[part], node_run[part]
                node_out[last] = node_run[last]
        return build(Settings, out)

    def _reject(self, version: int, exc: ConfigError) -> None:
        self.error = {"version": version, **exc.as_dict(), "message": str(exc)}
        self._metrics.applies.labels("rejected").inc()
        log.error("rejected configuration version %d: %s; keeping version %d", version, exc, self.version)

    def status(self) -> dict[str, Any]:
        """For ``GET /v1/config``: version, document, what is in force, errors, restart needs."""
        return {
            "version": self.version,
            "document": self.document or {},
            "error": self.error,
            "needs_restart": self.needs_restart,
            "applied_at": None if self.applied_at is None else
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.applied_at)),
            "watching": self.watch.connected,
            "effective": redacted(to_document(self.running)),
        }

    async def put(self, document: Any, expected: int | None = None) -> int:
        """Validate and store a new version (CAS on ``expected``, default the version last seen stored, which is
        the one in force here unless this sidecar rejected a later one)."""
        if not isinstance(document, Mapping):
            raise ConfigError("<document>", document, "must be a JSON object with the settings' sections")
        return await write_document(self._etcd, self.prefix, document, self.seen if expected is None else expected)

    async def history(self) -> list[dict[str, Any]]:
        return await document_history(self._etcd, self.prefix)
