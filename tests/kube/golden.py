"""The golden cases of tests/testdata/inject: input files, their options, and the update mode.

``SIDECAR_UPDATE_GOLDEN=1 pytest tests/kube`` rewrites every golden file from the current output;
review the diff before committing it.
"""

from __future__ import annotations

import io
import os
import shlex
from pathlib import Path

from sidecar.cli import parser
from sidecar.kube.command import inject, options_from
from sidecar.kube.inject import InjectOptions

DATA = Path(__file__).resolve().parent.parent / "testdata" / "inject"
CASES = sorted(p.name.removesuffix(".input.yaml") for p in DATA.glob("*.input.yaml"))
UPDATE = os.environ.get("SIDECAR_UPDATE_GOLDEN") == "1"
# The cluster DNS address every case passes; a case adds flags with a "# inject: ..." line.
BASE_ARGS = ("--upstream-dns", "10.96.0.10")


def case_args(case: str) -> list[str]:
    """``sidecar inject`` arguments for a case: the base ones, then its ``# inject:`` line."""
    extra: list[str] = []
    for line in (DATA / f"{case}.input.yaml").read_text().splitlines():
        if line.startswith("# inject:"):
            extra = shlex.split(line.removeprefix("# inject:"))
    return ["inject", *BASE_ARGS, *extra, str(DATA / f"{case}.input.yaml")]


def case_options(case: str) -> InjectOptions:
    """The InjectOptions the real parser makes of the case's arguments."""
    return options_from(parser().parse_args(case_args(case)))


def run_inject(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    """``sidecar inject`` in-process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = inject(parser().parse_args(argv), io.StringIO(stdin), out, err)
    return code, out.getvalue(), err.getvalue()


def check_golden(path: Path, actual: str) -> None:
    """Compare ``actual`` with the golden file (or rewrite it in update mode)."""
    if UPDATE or not path.exists():
        if not UPDATE:
            raise AssertionError(f"{path.name} is missing: run with SIDECAR_UPDATE_GOLDEN=1 and review it")
        path.write_text(actual)
        return
    assert actual == path.read_text(), f"{path.name} differs (SIDECAR_UPDATE_GOLDEN=1 rewrites it)"
