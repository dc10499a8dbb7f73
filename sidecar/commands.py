"""The bodies of the commands that talk to etcd directly: register, agents, config.

cli.py parses argv, builds settings and calls these; they return an exit
status and raise typed errors (cli.py turns those into messages and exits).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from .cards import card_key, merge_card
from .catalog import Catalog, Reset
from .config import A2aSettings, EtcdSettings, Settings, load_file_document
from .discovery import Query, agents_document
from .dynamic import (
    config_key,
    document_at,
    document_history,
    parse_document,
    read_stored,
    starting_document,
    validate_document,
    write_document,
)
from .errors import ConfigError, SidecarError, ValidationError
from .model import decode_agent, new_agent_id, parse_agent
from .registry.api import Registry
from .registry.etcd import EtcdClient
from .registry.sync import services_prefix

log = logging.getLogger("sidecar")


async def run(settings: Settings, stop: asyncio.Event, reread: Callable[[], Settings]) -> int:
    """The daemon: the stored document over ``settings``, then serve until ``stop``; SIGHUP re-reads the file."""
    from .server import Server

    client = _client(settings.etcd)
    try:
        starting = await starting_document(settings, client)
    finally:
        await client.close()
    # The store keeps ``settings`` as the base every version is laid over; the document is not merged in.
    server = Server(settings, starting=starting)

    def reload() -> None:
        try:
            fresh = reread()
        except SidecarError as exc:
            log.error("SIGHUP: the configuration file is invalid, keeping the running settings: %s", exc)
            return
        log.info("SIGHUP: configuration file re-read")
        server.config.reload(fresh)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await server.run(stop)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
    return 0


def _client(etcd: EtcdSettings) -> EtcdClient:
    return EtcdClient.from_settings(etcd)


def meta_pairs(values: Sequence[str], key: str) -> dict[str, str]:
    """``k=v`` strings as a mapping; ConfigError naming ``key`` for one without ``=``."""
    pairs = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(key, item, "must be k=v")
        pairs[name] = value
    return pairs


async def register(args: argparse.Namespace, etcd: EtcdSettings, stop: asyncio.Event,
                   a2a_settings: A2aSettings | None = None) -> int:
    """Register one agent (with ``--card``: its card too, on the agent's lease, as a sidecar stores its local
    agent's) and keep the lease alive until ``stop``."""
    data = {
        "id": args.id or new_agent_id(args.name), "name": args.name, "address": args.address,
        "port": args.port, "ttl": args.ttl, "capabilities": args.capability, "tags": args.tag,
        "metadata": meta_pairs(args.meta, "--meta"), "version": args.agent_version,
        "protocol": args.protocol, "weight": args.weight, "zone": args.zone, "health": {"status": args.status},
    }
    card = None
    if args.card:
        from .health import a2a

        limit = (a2a_settings or A2aSettings()).max_card_bytes
        card = await a2a.read_card(args.card, 5.0, limit=limit)
        explicit = ["name", "port", *(["capabilities"] if args.capability else []),
                    *(["version"] if args.agent_version else [])]
        data = merge_card(data, card, explicit)
    agent = parse_agent(data, strict=True)
    async with Registry(etcd.endpoints, prefix=etcd.prefix, timeout=etcd.request_timeout,
                        client=EtcdClient.from_settings(etcd)) as registry:
        registration = await registry.register(agent)
        stored = ""
        if card is not None:
            await registration.attach_card(card.raw)
            stored = f", card at {card_key(etcd.prefix, agent.name, agent.id)}"
        print(f"registered {registration.key} (lease {registration.lease_id:x}, ttl {agent.ttl:g}s{stored}); "
              "Ctrl-C deregisters", flush=True)
        await stop.wait()
    print(f"deregistered {registration.key}", flush=True)
    return 0


async def agents(args: argparse.Namespace, etcd: EtcdSettings) -> int:
    """The ``GET /v1/agents`` document (``--json``) or a table of it: read from etcd, or with ``--admin``
    asked of that sidecar (whose document also has its ``owned``, ``breaker`` and ``pending``)."""
    if args.admin:
        document = await _admin_agents(args.admin, args.capability, args.tag, args.name)
    else:
        document = await _etcd_agents(etcd, Query.of(args.capability, args.tag, args.name))
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    rows = [("ID", "NAME", "ADDRESS", "PORT", "HEALTH", "WEIGHT", "ZONE", "CAPABILITIES", "TAGS")]
    for agent in document["agents"]:
        rows.append((agent["id"], agent["name"], agent["address"], str(agent["port"]), agent["health"]["status"],
                     str(agent["weight"]), agent["zone"] or "-", ",".join(agent["capabilities"]) or "-",
                     ",".join(agent["tags"]) or "-"))
    _table(rows)
    pending = f", {len(document['pending'])} pending" if document["pending"] else ""
    print(f"{len(document['agents'])} agent(s) at revision {document['revision']}{pending}", file=sys.stderr)
    return 0


async def _etcd_agents(etcd: EtcdSettings, query: Query) -> dict[str, Any]:
    """The document as a reader of etcd alone makes it (no lease kept, no proxy: see ``SIDECAR_FIELDS``)."""
    client = _client(etcd)
    try:
        revision, kvs = await client.get_prefix(services_prefix(etcd.prefix))
    finally:
        await client.close()
    found = {}
    for kv in kvs:
        try:
            found[kv.key] = decode_agent(kv.value)
        except (ValueError, ValidationError) as exc:
            print(f"warning: skipping {kv.key}: {exc}", file=sys.stderr)
    return agents_document(Catalog().apply([Reset(revision, found)]), query, etcd.prefix)


async def _admin_agents(admin: str, capability: str | None, tags: Sequence[str], name: str | None) -> dict[str, Any]:
    """``GET /v1/agents`` of the sidecar whose admin API is at ``admin`` (a URL, or HOST:PORT)."""
    import aiohttp

    base = (admin if "://" in admin else f"http://{admin}").rstrip("/")
    params = [("capability", capability or ""), *(("tag", tag) for tag in tags), ("name", name or "")]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
                session.get(f"{base}/v1/agents", params=[(k, v) for k, v in params if v]) as response:
            if response.status != 200:
                raise SidecarError(f"admin API {base}: GET /v1/agents answered {response.status}: "
                                   f"{(await response.text())[:500]}")
            document = await response.json()
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        raise SidecarError(f"admin API {base}: {exc or type(exc).__name__}") from None
    if not isinstance(document, dict):
        raise SidecarError(f"admin API {base}: GET /v1/agents did not answer a JSON object")
    return document


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def read_document_file(path: str) -> dict[str, Any]:
    """A dynamic document from a YAML or JSON file (``-``: stdin), sections at top level."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
    except OSError as exc:
        raise ConfigError("FILE", path, f"cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError("FILE", path, f"not valid YAML or JSON{at}: {getattr(exc, 'problem', exc)}") from None
    return load_file_document(data, path)


def _summary(document: Mapping[str, Any], path: str = "") -> list[str]:
    keys = []
    for key, value in document.items():
        if isinstance(value, Mapping) and value:
            keys += _summary(value, f"{path}{key}.")
        else:
            keys.append(f"{path}{key}")
    return keys


async def config(args: argparse.Namespace, etcd: EtcdSettings) -> int:
    """``sidecar config show|set|validate|history|rollback``."""
    if args.action == "validate":
        document = read_document_file(args.file)
        validate_document(document)
        print(f"valid: sets {', '.join(_summary(document)) or 'nothing'}")
        return 0
    client = _client(etcd)
    try:
        if args.action == "show":
            return await _show(client, etcd.prefix)
        if args.action == "history":
            versions = await document_history(client, etcd.prefix, args.limit)
            if args.json:
                print(json.dumps({"versions": versions}, indent=2))
                return 0
            rows = [("VERSION", "VALID", "SETS")]
            for entry in versions:
                sets = ", ".join(_summary(entry.get("document", {}))) if entry["valid"] else entry["error"]
                rows.append((str(entry["version"]), "yes" if entry["valid"] else "no", sets or "-"))
            _table(rows)
            print(f"{len(versions)} version(s); older ones are gone once etcd compacts them", file=sys.stderr)
            return 0
        if args.action == "set":
            document = read_document_file(args.file)
        else:
            document = await document_at(client, etcd.prefix, args.version)
        expected = args.expect_version
        if expected is None:
            # Only the version: a stored value that does not parse is replaced like any other.
            expected, _ = await read_stored(client, etcd.prefix)
        written = await write_document(client, etcd.prefix, document, expected)
        what = f"rolled back to version {args.version}" if args.action == "rollback" else "stored"
        print(f"{what}: configuration version {written} (was {expected or 'none'})")
        return 0
    finally:
        await client.close()


async def _show(client: EtcdClient, prefix: str) -> int:
    """The stored document and its version; one that does not parse or validate is shown with its error, status 1."""
    version, raw = await read_stored(client, prefix)
    if raw is None:
        print(json.dumps({"version": 0, "document": {}}, indent=2))
        print("no dynamic configuration is stored; every sidecar runs on its own settings", file=sys.stderr)
        return 0
    shown: dict[str, Any] = {"version": version}
    try:
        shown["document"] = parse_document(raw, config_key(prefix))
        validate_document(shown["document"])
    except ConfigError as exc:
        shown.setdefault("document", None)
        shown["error"] = str(exc)
        if shown["document"] is None:
            shown["raw"] = raw.decode(errors="replace")
        print(json.dumps(shown, indent=2))
        print(f"sidecar: the stored configuration version {version} is refused by every sidecar: {exc}; "
              "`sidecar config set FILE` or `rollback VERSION` replaces it", file=sys.stderr)
        return 1
    print(json.dumps(shown, indent=2))
    return 0
