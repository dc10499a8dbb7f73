"""argv / env / YAML file -> Settings -> the command. The only place that calls sys.exit.

Precedence for ``sidecar run``: flag > environment (``SIDECAR_<FLAG>``) > file > default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from . import __version__
from .config import Settings, build, load_file_document, merge
from .errors import ConfigError, RegistryUnavailable, SidecarError, ValidationError

log = logging.getLogger("sidecar")


@dataclass(frozen=True)
class Flag:
    """One ``run`` flag: its option, the dotted settings key it sets, and its help."""

    option: str
    key: str
    help: str
    repeat: bool = False

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return "SIDECAR_" + self.dest.upper()


RUN_FLAGS: tuple[Flag, ...] = (
    Flag("--etcd-endpoints", "etcd.endpoints", "comma-separated etcd URLs (also ETCD_ENDPOINTS)"),
    Flag("--prefix", "etcd.prefix", "etcd key prefix (default empty)"),
    Flag("--domain", "dns.domain", "DNS zone served (default agents.local)"),
    Flag("--dns-listen", "dns.listen", "DNS HOST:PORT, UDP and TCP (default 127.0.0.1:15053)"),
    Flag("--proxy-listen", "proxy.listen", "HTTP proxy HOST:PORT (default 127.0.0.1:15001)"),
    Flag("--admin-listen", "admin.listen", "admin API HOST:PORT (default 127.0.0.1:15000)"),
    Flag("--grpc-listen", "grpc.listen", "gRPC API HOST:PORT (default 127.0.0.1:15010)"),
    Flag("--upstream-dns", "dns.upstreams", "upstream resolvers HOST:PORT[,...], or none (default resolv.conf)"),
    Flag("--dns-a-mode", "dns.a_mode", "direct: A records are the agents; proxy: the proxy's address"),
    Flag("--admin-token", "admin.token", "bearer token required by mutating admin calls"),
    Flag("--loop", "loop", "event loop: uvloop (default) or asyncio"),
    Flag("--log-level", "log_level", "debug, info, warning or error"),
    Flag("--agent-name", "agent.name", "local agent: service name"),
    Flag("--agent-id", "agent.id", "local agent: id (default generated)"),
    Flag("--agent-address", "agent.address", "local agent: address (default POD_IP, else this host's)"),
    Flag("--agent-port", "agent.port", "local agent: port"),
    Flag("--agent-capability", "agent.capabilities", "local agent: capability (repeatable)", repeat=True),
    Flag("--agent-tag", "agent.tags", "local agent: tag (repeatable)", repeat=True),
    Flag("--agent-meta", "agent.metadata", "local agent: metadata k=v (repeatable)", repeat=True),
    Flag("--agent-weight", "agent.weight", "local agent: weight (default 100)"),
    Flag("--agent-zone", "agent.zone", "local agent and this sidecar: zone"),
    Flag("--agent-ttl", "agent.ttl", "local agent: lease TTL (default 10s)"),
    Flag("--agent-health-url", "agent.health.url", "local agent: health check URL"),
    Flag("--agent-health-type", "agent.health.type", "local agent: http, tcp or grpc"),
    Flag("--agent-card", "agent.card", "local agent: A2A agent card URL or file"),
)


def _nested(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def _meta_value(values: Sequence[str], key: str) -> dict[str, str]:
    pairs = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(key, item, "must be k=v")
        pairs[name] = value
    return pairs


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError("--config", path, f"cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError("--config", path, f"not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return load_file_document(data, path)


def settings_from(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    """Settings for ``run``: flag > env > file > default."""
    config_path = args.config or environ.get("SIDECAR_CONFIG")
    document: dict[str, Any] = _read_file(config_path) if config_path else {}
    env_layer: dict[str, Any] = {}
    if environ.get("ETCD_ENDPOINTS"):
        env_layer = merge(env_layer, _nested("etcd.endpoints", environ["ETCD_ENDPOINTS"]))
    flag_layer: dict[str, Any] = {}
    for flag in RUN_FLAGS:
        raw_env = environ.get(flag.env)
        if raw_env is not None:
            value: Any = raw_env
            if flag.key == "agent.metadata":
                value = _meta_value([v for v in raw_env.split(",") if v], flag.env)
            env_layer = merge(env_layer, _nested(flag.key, value))
        given = getattr(args, flag.dest, None)
        if given is not None and given != []:
            if flag.key == "agent.metadata":
                given = _meta_value(given, flag.option)
            flag_layer = merge(flag_layer, _nested(flag.key, given))
    return build(Settings, merge(merge(document, env_layer), flag_layer))


def _endpoints(args: argparse.Namespace, environ: dict[str, str]) -> list[str]:
    raw = args.etcd_endpoints or environ.get("SIDECAR_ETCD_ENDPOINTS") or environ.get("ETCD_ENDPOINTS")
    raw = raw or "http://127.0.0.1:2379"
    return [e.strip() for e in raw.split(",") if e.strip()]


def _prefix(args: argparse.Namespace, environ: dict[str, str]) -> str:
    if args.prefix is not None:
        return str(args.prefix)
    return environ.get("SIDECAR_PREFIX", "")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="sidecar", description="Discovery and routing sidecar for AI agents.")
    top.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="the daemon: DNS, proxy, admin API, local agent")
    run.add_argument("--config", help="YAML configuration file (also SIDECAR_CONFIG)")
    for flag in RUN_FLAGS:
        if flag.repeat:
            run.add_argument(flag.option, dest=flag.dest, action="append", default=[], help=flag.help)
        else:
            run.add_argument(flag.option, dest=flag.dest, help=flag.help)

    dev = commands.add_parser("dev", help="private etcd + sidecar + demo agents, for trying things out")
    dev.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")

    register = commands.add_parser("register", help="register an agent and keep its lease alive until interrupted")
    _etcd_options(register)
    register.add_argument("--name", required=True)
    register.add_argument("--id", help="default: <name>-<random>")
    register.add_argument("--address", required=True)
    register.add_argument("--port", type=int, required=True)
    register.add_argument("--ttl", default="10s", help="lease TTL (default 10s)")
    register.add_argument("--capability", action="append", default=[], help="repeatable")
    register.add_argument("--tag", action="append", default=[], help="repeatable")
    register.add_argument("--meta", action="append", default=[], help="k=v, repeatable")
    register.add_argument("--version", dest="agent_version", default="")
    register.add_argument("--protocol", default="http")
    register.add_argument("--weight", type=int, default=100)
    register.add_argument("--zone", default="")
    register.add_argument("--status", default="healthy", choices=("healthy", "unhealthy", "unknown"))
    register.add_argument("--card", help="A2A agent card URL or file: skills -> capabilities, tags, metadata")

    agents = commands.add_parser("agents", help="table of registered agents with health")
    _etcd_options(agents)
    agents.add_argument("--capability")
    agents.add_argument("--tag", action="append", default=[])
    agents.add_argument("--name")
    agents.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    _kube_commands(commands)
    return top


def _kube_commands(commands: Any) -> None:
    from .kube.command import add_inject_options, add_webhook_options

    inject = commands.add_parser("inject", help="add the sidecar to Kubernetes YAML (files, directories or -)")
    inject.add_argument("paths", nargs="*", metavar="PATH", help="YAML file or directory; - or none: stdin")
    inject.add_argument("--namespace", help="namespace for objects that name none (default: default)")
    add_inject_options(inject)
    webhook = commands.add_parser("webhook", help="the mutating admission webhook (TLS) doing the same injection")
    add_webhook_options(webhook)


def _etcd_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--etcd-endpoints", help="comma-separated etcd URLs (also ETCD_ENDPOINTS)")
    command.add_argument("--prefix", help="etcd key prefix (default empty)")


def _runner(loop_name: str) -> asyncio.Runner:
    if loop_name == "uvloop":
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def _run_until_signal(loop_name: str, main: Callable[[asyncio.Event], Coroutine[Any, Any, int]]) -> int:
    async def wrapper() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        return await main(stop)

    with _runner(loop_name) as runner:
        return runner.run(wrapper())


async def _run(settings: Settings, stop: asyncio.Event) -> int:
    from .server import Server

    server = Server(settings)
    await server.run(stop)
    return 0


async def _register(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from .model import new_agent_id, parse_agent
    from .registry.api import Registry

    data = {
        "id": args.id or new_agent_id(args.name), "name": args.name, "address": args.address,
        "port": args.port, "ttl": args.ttl, "capabilities": args.capability, "tags": args.tag,
        "metadata": _meta_value(args.meta, "--meta"), "version": args.agent_version,
        "protocol": args.protocol, "weight": args.weight, "zone": args.zone, "health": {"status": args.status},
    }
    if args.card:
        from .health import a2a

        card = await a2a.load_card(args.card, 5.0)
        explicit = ["name", "port", *(["capabilities"] if args.capability else []),
                    *(["version"] if args.agent_version else [])]
        data = a2a.merge_card(data, card, explicit)
    agent = parse_agent(data, strict=True)
    environ = dict(os.environ)
    async with Registry(_endpoints(args, environ), prefix=_prefix(args, environ)) as registry:
        registration = await registry.register(agent)
        print(f"registered {registration.key} (lease {registration.lease_id:x}, ttl {agent.ttl:g}s); "
              "Ctrl-C deregisters", flush=True)
        await stop.wait()
    print(f"deregistered {registration.key}", flush=True)
    return 0


async def _agents(args: argparse.Namespace) -> int:
    from .catalog import Catalog, Reset
    from .model import decode_agent, label
    from .registry.etcd import EtcdClient
    from .registry.sync import services_prefix

    environ = dict(os.environ)
    client = EtcdClient(_endpoints(args, environ), timeout=5)
    try:
        revision, kvs = await client.get_prefix(services_prefix(_prefix(args, environ)))
    finally:
        await client.close()
    agents = {}
    for kv in kvs:
        try:
            agents[kv.key] = decode_agent(kv.value)
        except (ValueError, ValidationError) as exc:
            print(f"warning: skipping {kv.key}: {exc}", file=sys.stderr)
    snapshot = Catalog().apply([Reset(revision, agents)])
    found = snapshot.select(capability=label(args.capability) if args.capability else None,
                            tags=[label(t) for t in args.tag], name=label(args.name) if args.name else None)
    if args.json:
        for agent in found:
            print(json.dumps(agent.to_json()))
        return 0
    rows = [("ID", "NAME", "ADDRESS", "PORT", "HEALTH", "WEIGHT", "ZONE", "CAPABILITIES", "TAGS")]
    for agent in found:
        rows.append((agent.id, agent.name, agent.address, str(agent.port), agent.health.status, str(agent.weight),
                     agent.zone or "-", ",".join(agent.capabilities) or "-", ",".join(agent.tags) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"{len(found)} agent(s) at revision {revision}", file=sys.stderr)
    return 0


# How an expected failure is told (one line on stderr, no traceback) and the exit status.
_FAILURES: tuple[tuple[type[BaseException], str, int], ...] = (
    (ConfigError, "invalid configuration: ", 2),
    (ValidationError, "invalid agent: ", 2),
    (RegistryUnavailable, "etcd unavailable: ", 1),
    (SidecarError, "", 1),
    (OSError, "", 1),
)


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    environ = dict(os.environ)
    try:
        if args.command == "run":
            settings = settings_from(args, environ)
            logging.basicConfig(level=settings.log_level.upper(),
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            code = _run_until_signal(settings.loop, lambda stop: _run(settings, stop))
        elif args.command == "dev":
            from .dev import dev

            logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            code = _run_until_signal(args.loop, lambda stop: dev(stop, args.loop))
        elif args.command == "register":
            logging.basicConfig(level="WARNING")
            code = _run_until_signal("asyncio", lambda stop: _register(args, stop))
        elif args.command == "agents":
            code = asyncio.run(_agents(args))
        elif args.command in ("inject", "webhook"):
            from .kube import command as kube

            if args.command == "inject":
                code = kube.inject(args, sys.stdin, sys.stdout, sys.stderr)
            else:
                logging.basicConfig(level=args.log_level.upper(),
                                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
                code = _run_until_signal("asyncio", lambda stop: kube.webhook(args, stop))
        else:  # pragma: no cover - argparse rejects unknown commands
            code = 2
    except (SidecarError, OSError) as exc:
        for kind, what, status in _FAILURES:
            if isinstance(exc, kind):
                print(f"sidecar: {what}{exc}", file=sys.stderr)
                sys.exit(status)
        raise
    except KeyboardInterrupt:
        code = 130
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    sys.exit(code)
