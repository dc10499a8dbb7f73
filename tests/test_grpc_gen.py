"""The committed gRPC code is what ``python -m sidecar.grpc_gen.regenerate`` makes from proto/ today."""

from __future__ import annotations

from pathlib import Path

from sidecar.grpc_gen import regenerate


def test_generated_code_is_current(tmp_path: Path) -> None:
    fresh = {path.name: path.read_text() for path in regenerate.generate(tmp_path)}
    committed = {path.name: path.read_text() for path in regenerate.HERE.glob("*_pb2*")}
    assert fresh, "protoc wrote nothing"
    hint = "run python -m sidecar.grpc_gen.regenerate"
    assert sorted(committed) == sorted(fresh), f"the generated files differ in name: {hint}"
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} is stale: {hint}"
