"""argv / env / YAML file -> Settings -> the command. The only place that calls sys.exit.

Precedence for ``sidecar run``: flag > environment (``SIDECAR_<FLAG>``) > file > default.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import typing
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from . import __version__, commands
from .commands import meta_pairs
from .config import A2aSettings, EtcdSettings, Settings, build, load_file_document, merge
from .errors import AgentExists, ConfigConflict, ConfigError, RegistryUnavailable, SidecarError, ValidationError

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


ETCD_FLAGS: tuple[Flag, ...] = (
    Flag("--etcd-endpoints", "etcd.endpoints", "comma-separated etcd URLs (also ETCD_ENDPOINTS)"),
    Flag("--prefix", "etcd.prefix", "etcd key prefix (default empty)"),
)
RUN_FLAGS: tuple[Flag, ...] = (
    *ETCD_FLAGS,
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
    Flag("--log-format", "log_format", "text (default) or json: one JSON object a line, with the trace id"),
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


def _layers(args: argparse.Namespace, environ: Mapping[str, str], flags: Sequence[Flag]) -> dict[str, Any]:
    """The settings document of flag > environment > file (``--config`` or SIDECAR_CONFIG)."""
    config_path = getattr(args, "config", None) or environ.get("SIDECAR_CONFIG")
    document: dict[str, Any] = _read_file(config_path) if config_path else {}
    env_layer: dict[str, Any] = {}
    if environ.get("ETCD_ENDPOINTS"):
        env_layer = merge(env_layer, _nested("etcd.endpoints", environ["ETCD_ENDPOINTS"]))
    flag_layer: dict[str, Any] = {}
    for flag in flags:
        raw_env = environ.get(flag.env)
        if raw_env is not None:
            value: Any = raw_env
            if flag.key == "agent.metadata":
                value = meta_pairs([v for v in raw_env.split(",") if v], flag.env)
            env_layer = merge(env_layer, _nested(flag.key, value))
        given = getattr(args, flag.dest, None)
        if given is not None and given != []:
            if flag.key == "agent.metadata":
                given = meta_pairs(given, flag.option)
            flag_layer = merge(flag_layer, _nested(flag.key, given))
    return merge(merge(document, env_layer), flag_layer)


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Settings for ``run``: flag > env > file > default."""
    return typing.cast(Settings, build(Settings, _layers(args, environ, RUN_FLAGS)))


def etcd_settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> EtcdSettings:
    """The etcd section for commands that talk to etcd: flag > env > file > default."""
    layered = _layers(args, environ, ETCD_FLAGS)
    return typing.cast(EtcdSettings, build(EtcdSettings, layered.get("etcd", {}), "etcd."))


def a2a_settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> A2aSettings:
    """The a2a section of the file (``--config``), for ``register --card``: file > default."""
    layered = _layers(args, environ, ())
    return typing.cast(A2aSettings, build(A2aSettings, layered.get("a2a", {}), "a2a."))


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
    agents.add_argument("--json", action="store_true", help="the document GET /v1/agents gives, instead of a table")
    agents.add_argument("--admin", metavar="URL",
                        help="ask the sidecar whose admin API is at URL (e.g. http://127.0.0.1:15000) instead of "
                             "etcd: its exact GET /v1/agents, with its owned, breaker and pending")

    config = commands.add_parser("config", help="the dynamic configuration stored in etcd")
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="the stored document and its version")
    set_ = actions.add_parser("set", help="validate FILE (YAML or JSON) and store it as the new version")
    set_.add_argument("file", metavar="FILE", help="the document; - reads stdin")
    validate = actions.add_parser("validate", help="validate FILE without storing it (no etcd needed)")
    validate.add_argument("file", metavar="FILE", help="the document; - reads stdin")
    history = actions.add_parser("history", help="stored versions, newest first (as far as compaction keeps)")
    history.add_argument("--limit", type=int, default=50)
    history.add_argument("--json", action="store_true")
    rollback = actions.add_parser("rollback", help="store version REV again as the newest version")
    rollback.add_argument("version", metavar="REV", type=int)
    for action in (show, set_, validate, history, rollback):
        _etcd_options(action)
    for action in (set_, rollback):
        action.add_argument("--expect-version", type=int,
                            help="write only if the stored version is still this one (default: the one just read)")
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
    command.add_argument("--config", help="YAML file whose etcd section (and for register --card, a2a section) "
                         "is used (also SIDECAR_CONFIG)")


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


# How an expected failure is told (one line on stderr, no traceback) and the exit status.
_FAILURES: tuple[tuple[type[BaseException], str, int], ...] = (
    (ConfigError, "invalid configuration: ", 2),
    (ConfigConflict, "conflict: ", 1),
    (AgentExists, "", 1),
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
            from .logs import stderr_handler

            logging.basicConfig(level=settings.log_level.upper(), handlers=[stderr_handler(settings.log_format)])
            code = _run_until_signal(settings.loop, lambda stop: commands.run(
                settings, stop, lambda: settings_from(args, dict(os.environ))))
        elif args.command == "dev":
            from .dev import dev

            logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            code = _run_until_signal(args.loop, lambda stop: dev(stop, args.loop))
        elif args.command == "register":
            logging.basicConfig(level="WARNING")
            etcd = etcd_settings_from(args, environ)
            a2a = a2a_settings_from(args, environ)
            code = _run_until_signal("asyncio", lambda stop: commands.register(args, etcd, stop, a2a))
        elif args.command == "agents":
            code = asyncio.run(commands.agents(args, etcd_settings_from(args, environ)))
        elif args.command == "config":
            logging.basicConfig(level="WARNING")
            code = asyncio.run(commands.config(args, etcd_settings_from(args, environ)))
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
    except BrokenPipeError:
        # The reader went away (| head): what it wanted was printed; end quietly. Before the
        # OSError clause below, which would catch it (BrokenPipeError is an OSError).
        _quiet_stdout()
        sys.exit(0)
    except (SidecarError, OSError) as exc:
        for kind, what, status in _FAILURES:
            if isinstance(exc, kind):
                print(f"sidecar: {what}{exc}", file=sys.stderr)
                sys.exit(status)
        raise
    except KeyboardInterrupt:
        code = 130
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
    sys.exit(code)


def _quiet_stdout() -> None:
    # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
