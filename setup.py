"""Builds the proxy's per-request modules with mypyc when it can; the pure-Python modules
are the fallback and stay importable and tested (docs/proxy.md, "Compiled hot path").

``SIDECAR_PURE=1 pip install .`` skips the compilation. Without a C compiler, or when
mypyc fails, the install goes on with the pure modules.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The modules a proxied request runs through (not the shells that bind sockets or read settings).
COMPILED = [
    "sidecar/proxy/heads.py",
    "sidecar/proxy/policy.py",
    "sidecar/proxy/exchange.py",
    "sidecar/proxy/flight.py",
    "sidecar/proxy/relay.py",
    "sidecar/proxy/upstream.py",
    "sidecar/proxy/client.py",
    "sidecar/proxy/pool.py",
    "sidecar/proxy/load.py",
    "sidecar/proxy/limits.py",
    "sidecar/proxy/retries.py",
    "sidecar/proxy/ticket.py",
    "sidecar/proxy/balancers/round_robin.py",
    "sidecar/proxy/balancers/weighted_random.py",
    "sidecar/proxy/balancers/least_conn.py",
    "sidecar/proxy/balancers/p2c_ewma.py",
]


class OptionalBuildExt(build_ext):
    """Compile what can be compiled; a failure leaves the pure-Python module in place."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers
            print(f"sidecar: not compiling the proxy hot path ({exc}); using pure Python", file=sys.stderr)

    def build_extension(self, ext: object) -> None:
        try:
            super().build_extension(ext)  # type: ignore[arg-type]
        except Exception as exc:
            print(f"sidecar: not compiling {getattr(ext, 'name', ext)} ({exc}); using pure Python", file=sys.stderr)


def extensions() -> list[object]:
    if os.environ.get("SIDECAR_PURE") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    try:
        return list(mypycify(COMPILED, opt_level="3"))
    except Exception as exc:
        print(f"sidecar: mypyc failed ({exc}); using pure Python", file=sys.stderr)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
