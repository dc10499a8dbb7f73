"""A short smoke of each fuzz harness (the long runs are in docs/reliability.md): it runs and finds nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris (the test extra) runs the fuzz harnesses")
HERE = Path(__file__).parent


@pytest.mark.parametrize("harness", ["fuzz_dns.py", "fuzz_http.py"])
def test_the_harness_runs_clean(harness: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    smoke = {**os.environ, "FUZZ_SMOKE": "1"}
    subprocess.run([sys.executable, str(HERE / harness), "--seed", str(corpus)], check=True, capture_output=True,
                   timeout=120, env=smoke)
    result = subprocess.run([sys.executable, str(HERE / harness), "-runs=2000", "-max_len=512", str(corpus)],
                            capture_output=True, text=True, timeout=300, env=smoke)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 2000 runs" in result.stderr


def test_the_http_regressions_stay_fixed() -> None:
    # Inputs that once failed, as the requests the harness fed (FUZZ_RAW: not mutated again).
    inputs = sorted(str(p) for p in (HERE / "regressions" / "http").iterdir())
    assert inputs
    result = subprocess.run([sys.executable, str(HERE / "fuzz_http.py"), *inputs], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "FUZZ_SMOKE": "1", "FUZZ_RAW": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
