"""How the deploy tests check a ``sidecar`` command line: the real parser, then the real settings."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import pytest

from sidecar.cli import RUN_FLAGS, parser, settings_from
from sidecar.config import Settings

# Environment variables ``sidecar run`` reads besides SIDECAR_<FLAG>.
RUN_ENV = frozenset({flag.env for flag in RUN_FLAGS} | {"SIDECAR_CONFIG", "ETCD_ENDPOINTS"})


def parse(argv: list[str], where: str) -> argparse.Namespace:
    """``argv`` (without the program name) parsed by ``sidecar.cli.parser()``; a failure names ``where``."""
    try:
        return parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `sidecar {' '.join(argv)}` is not a valid command line (see stderr)")


def run_settings(argv: list[str], env: Mapping[str, str], files: Mapping[str, str], where: str) -> Settings:
    """The Settings ``sidecar run`` would start with, a mounted ``--config`` path mapped to its repo file."""
    args = parse(argv, where)
    assert args.command == "run", f"{where}: {argv}"
    unknown = sorted(k for k in env if k.startswith("SIDECAR_") and k not in RUN_ENV)
    assert not unknown, f"{where}: environment variables sidecar run does not read: {unknown}"
    config = args.config or env.get("SIDECAR_CONFIG")
    if config:
        assert config in files, f"{where}: --config {config} is not mounted from a file in the repository"
        args.config = files[config]
    return settings_from(args, {k: v for k, v in env.items() if k != "SIDECAR_CONFIG"})
