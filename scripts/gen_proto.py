"""Regenerates the Python protobuf and gRPC code from proto/.

The output folder is deleted first so nothing stale survives. protoc writes
absolute imports (``from atlas.sidecar.v1 import events_pb2``); they are
rewritten to point inside the client package, the same way other SDKs that
vendor their generated code do.

Vendored third-party protos (``third_party/<name>/*.proto``, other projects'
APIs that adapters call) are generated the same way into the daemon package
that uses them (see ``VENDORED``); they are not part of the contract.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "clients" / "python" / "atlas_sidecar_client" / "_proto"
PKG = "atlas_sidecar_client._proto"
BIN = Path(sys.executable).parent

#: (proto folder, output folder, output package) of each vendored proto set.
VENDORED = [
    (
        ROOT / "third_party" / "triton",
        ROOT / "sidecar" / "control" / "adapters" / "_proto",
        "sidecar.control.adapters._proto",
    ),
]


def _protoc(root: Path, out: Path, protos: list[str]) -> int:
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    rc = int(protoc.main(args))
    if rc != 0:
        print(f"protoc failed for {root}", file=sys.stderr)
    return rc


def _vendored() -> int:
    for root, out, pkg in VENDORED:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        protos = sorted(str(p.relative_to(root)) for p in root.glob("*.proto"))
        rc = _protoc(root, out, protos)
        if rc != 0:
            return rc
        names = "|".join(re.escape(Path(p).stem) + "_pb2" for p in protos)
        pattern = re.compile(rf"^import ({names})\b", re.M)
        for path in out.glob("*"):
            if path.suffix in {".py", ".pyi"}:
                path.write_text(pattern.sub(rf"from {pkg} import \1", path.read_text()))
        (out / "__init__.py").touch()
    return 0


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        print("protoc failed", file=sys.stderr)
        return rc
    pattern = re.compile(r"^from atlas\.sidecar\.v1 import", re.M)
    pattern2 = re.compile(r"^import atlas\.sidecar\.v1\.(\w+)", re.M)
    for path in OUT.rglob("*"):
        if path.suffix in {".py", ".pyi"}:
            text = path.read_text()
            text = pattern.sub(f"from {PKG}.atlas.sidecar.v1 import", text)
            text = pattern2.sub(rf"import {PKG}.atlas.sidecar.v1.\1", text)
            path.write_text(text)
    for d in [OUT, *[p for p in OUT.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return _vendored()


if __name__ == "__main__":
    raise SystemExit(main())
