"""Regenerates the Python modules from the .proto sources (`make protos`).

Usage: python -m protos.generate [OUT_DIR]   (default: the repository root)

The generated modules register into `protos._pool.POOL` instead of protobuf's
default pool (see `_pool.py` for why); that rewrite is part of generation, so
the committed files are exactly what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
PROTO_FILES = ("grpc_service.proto", "mesh.proto")

_DEFAULT_POOL = "_descriptor_pool.Default()"
_OWN_POOL_IMPORT = "from protos._pool import POOL as _POOL\n"


def _own_pool(module: Path) -> None:
    text = module.read_text()
    if _DEFAULT_POOL not in text:
        raise RuntimeError(f"{module}: generated code no longer calls {_DEFAULT_POOL}")
    text = text.replace(_DEFAULT_POOL, "_POOL")
    anchor = "from google.protobuf.internal import builder as _builder\n"
    module.write_text(text.replace(anchor, anchor + _OWN_POOL_IMPORT, 1))


def generate(out_dir: Path) -> list[Path]:
    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{REPO_ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_DIR / name),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {name}")
        stem = name.removesuffix(".proto")
        _own_pool(out_dir / "protos" / f"{stem}_pb2.py")
        written += [out_dir / "protos" / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT
    for path in generate(target):
        print(path)
