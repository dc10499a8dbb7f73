"""The ``inject`` and ``webhook`` commands: their options, and the file reading around the pure core."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
from collections.abc import Iterator
from typing import IO

from ..errors import ConfigError
from .inject import InjectError, InjectOptions, default_etcd_endpoints, inject_yaml, upstream

YAML_SUFFIXES = (".yaml", ".yml")


def add_inject_options(command: argparse.ArgumentParser) -> None:
    """The options shared by ``inject`` and ``webhook``: what the injected sidecar looks like."""
    command.add_argument("--upstream-dns", required=True,
                         help="the cluster DNS service as IP[:PORT][,...] (kubectl -n kube-system get svc kube-dns)")
    command.add_argument("--image", default=InjectOptions.image, help=f"sidecar image (default {InjectOptions.image})")
    command.add_argument("--etcd-endpoints", help="comma-separated etcd URLs for the sidecars (default the "
                         "headless Service of deploy/kubernetes/etcd.yaml, one name for every member: "
                         f"{default_etcd_endpoints('<cluster-domain>')[0]})")
    command.add_argument("--domain", default=InjectOptions.domain, help="DNS zone the sidecars serve")
    command.add_argument("--cluster-domain", default=InjectOptions.cluster_domain,
                         help=f"the cluster's DNS domain, for the search path (default {InjectOptions.cluster_domain})")
    command.add_argument("--ndots", type=int, default=InjectOptions.ndots,
                         help=f"resolver ndots option unless the pod sets one (default {InjectOptions.ndots})")
    command.add_argument("--no-native", dest="native", action="store_false",
                         help="put the sidecar in containers, not as a native sidecar (clusters before 1.29)")
    command.add_argument("--config-map", default="", help="ConfigMap with sidecar.yaml, passed as --config")
    command.add_argument("--admin-token-secret", default=InjectOptions.admin_token_secret,
                         help="Secret (key 'token') for SIDECAR_ADMIN_TOKEN, used when it exists; '' for none")


def options_from(args: argparse.Namespace) -> InjectOptions:
    """InjectOptions from the parsed ``inject``/``webhook`` options."""
    upstreams = tuple(u.strip() for u in args.upstream_dns.split(",") if u.strip())
    if not upstreams:
        raise ConfigError("--upstream-dns", args.upstream_dns, "must name the cluster DNS service IP")
    for item in upstreams:
        host, _, port = upstream(item).rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ConfigError("--upstream-dns", item, "must be IP or IP:PORT (a pod's resolver takes addresses)") \
                from None
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("--upstream-dns", item, "the port must be 1 to 65535")
    if args.ndots < 1 or args.ndots > 15:
        raise ConfigError("--ndots", args.ndots, "must be 1 to 15")
    endpoints = (tuple(e.strip() for e in args.etcd_endpoints.split(",") if e.strip()) if args.etcd_endpoints
                 else default_etcd_endpoints(args.cluster_domain))
    return InjectOptions(upstream_dns=upstreams, image=args.image, etcd_endpoints=endpoints, domain=args.domain,
                         native=args.native, cluster_domain=args.cluster_domain, ndots=args.ndots,
                         namespace=getattr(args, "namespace", None) or "default", config_map=args.config_map,
                         admin_token_secret=args.admin_token_secret)


def _sources(paths: list[str]) -> Iterator[str]:
    for path in paths:
        if path == "-" or not os.path.isdir(path):
            yield path
            continue
        found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if name.endswith(YAML_SUFFIXES))
        if not found:
            raise InjectError(f"{path}: no .yaml or .yml file in this directory")
        yield from found


def inject(args: argparse.Namespace, stdin: IO[str], stdout: IO[str], stderr: IO[str]) -> int:
    """``sidecar inject``: every source's documents, injected, on stdout; one report line per object on stderr.

    Everything is read and injected before anything is written, so a bad file writes no partial output.
    """
    options = options_from(args)
    outputs = []
    for source in _sources(args.paths or ["-"]):
        try:
            if source == "-":
                text = stdin.read()
            else:
                with open(source, encoding="utf-8") as handle:
                    text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InjectError(f"{source}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            out, outcomes = inject_yaml(text, options)
        except InjectError as exc:
            raise InjectError(f"{'<stdin>' if source == '-' else source}: {exc}") from None
        for outcome in outcomes:
            print(f"{outcome}", file=stderr)
        outputs.append(out)
    for i, out in enumerate(outputs):
        if i and not out.lstrip().startswith("---"):
            stdout.write("---\n")
        stdout.write(out if out.endswith("\n") or not out else out + "\n")
    return 0


def add_webhook_options(command: argparse.ArgumentParser) -> None:
    """The webhook's own options, after the shared injection ones."""
    add_inject_options(command)
    command.add_argument("--listen", default="0.0.0.0:8443", help="HOST:PORT (default 0.0.0.0:8443)")
    command.add_argument("--tls-cert", required=True, help="PEM certificate (chain) file")
    command.add_argument("--tls-key", required=True, help="PEM private key file")
    command.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


async def webhook(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """``sidecar webhook``: serve AdmissionReviews until ``stop`` is set."""
    from .webhook import Webhook

    return await Webhook(options_from(args), args.listen, args.tls_cert, args.tls_key).run(stop)
