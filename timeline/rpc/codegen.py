"""Generate the gRPC API's Python code from timeline/rpc/v1/timeline.proto with grpcio-tools.

Run when the package is built or installed (setup.py's build_py, editable installs
included) and by the Dockerfile; never by hand, and its output is never committed:

    python -m timeline.rpc.codegen [OUTPUT_ROOT]   (default: the repository itself)

Writes timeline/rpc/v1/timeline_pb2.py (the messages), timeline_pb2.pyi (their types) and
timeline_pb2_grpc.py (the stub and the servicer's registration) under OUTPUT_ROOT, and
timeline_proto.sha256, the digest of the .proto they came from: timeline.rpc.v1 refuses
to load code generated from another version of the file.

Only the standard library is imported at module level: setup.py loads this file by its
path, before anything of the package (or grpcio) can be imported.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

#: The repository (or unpacked source distribution): the root the .proto's path is
#: relative to, which makes the generated modules import each other as timeline.rpc.v1.*.
ROOT = Path(__file__).resolve().parent.parent.parent
PROTO = Path("timeline/rpc/v1/timeline.proto")
#: What the build writes, relative to its output root.
GENERATED = (
    Path("timeline/rpc/v1/timeline_pb2.py"),
    Path("timeline/rpc/v1/timeline_pb2.pyi"),
    Path("timeline/rpc/v1/timeline_pb2_grpc.py"),
)
STAMP = Path("timeline/rpc/v1/timeline_proto.sha256")


def proto_digest(root: Path = ROOT) -> str:
    """The sha256 of the .proto the code is generated from."""
    return hashlib.sha256((root / PROTO).read_bytes()).hexdigest()


def generate(output: Path = ROOT) -> list[Path]:
    """Run protoc (grpcio-tools' own, no binary on PATH needed) on the .proto; returns the
    files written. Raises RuntimeError when protoc fails (it prints why on stderr)."""
    import importlib.resources

    from grpc_tools import protoc  # a build requirement only: see pyproject.toml

    # google/protobuf/timestamp.proto and the other well-known types ship with grpcio-tools.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    (output / PROTO.parent).mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={ROOT}",
            f"--proto_path={well_known}",
            f"--python_out={output}",
            f"--pyi_out={output}",
            f"--grpc_python_out={output}",
            str(ROOT / PROTO),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (status {status}); see above")
    (output / STAMP).write_text(proto_digest() + "\n", encoding="ascii")
    return [output / path for path in (*GENERATED, STAMP)]


def main() -> None:
    output = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    for path in generate(output):
        print(f"generated {path}")


if __name__ == "__main__":
    main()
