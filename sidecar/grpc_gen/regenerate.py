"""Regenerate the committed gRPC code from ``proto/``: ``python -m sidecar.grpc_gen.regenerate [OUT_DIR]``.

Needs grpcio-tools (the ``dev`` extra), pinned to the grpcio release the sidecar runs
on, so that the generated code and the runtime agree. ``OUT_DIR`` defaults to this
package; tests regenerate into a temporary directory and compare.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTOS = ("sidecar/v1/discovery.proto",)
HERE = Path(__file__).resolve().parent
# protoc writes absolute imports named after the proto path (``from sidecar.v1 import x_pb2``);
# the modules live in this package instead, so siblings are imported relatively.
_SIBLING_IMPORT = re.compile(r"^from sidecar\.v1 import (\w+_pb2)", re.MULTILINE)


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on every proto into ``out``; returns the files written."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).resolve().parent / "_proto"
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *(str(PROTO_ROOT / p) for p in PROTOS)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        for generated in sorted((Path(tmp) / "sidecar" / "v1").glob("*_pb2*")):
            target = out / generated.name
            target.write_text(_SIBLING_IMPORT.sub(r"from . import \1", generated.read_text()))
            written.append(target)
    return written


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else HERE
    for path in generate(out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
