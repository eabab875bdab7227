"""timeline.v1: the messages and stubs generated from timeline.proto (timeline/rpc/codegen.py).

They are generated when the package is installed (`pip install -e .`, which `make run` and
`make test` do) and never committed; a missing or stale generation is refused here, at
import, with what to run, rather than failing later on a field that is not there.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _check_generated() -> None:
    import hashlib

    proto = _HERE / "timeline.proto"
    stamp = _HERE / "timeline_proto.sha256"
    if not (_HERE / "timeline_pb2.py").exists() or not stamp.exists():
        raise ImportError(
            f"the gRPC code is not generated in {_HERE}: it is made from timeline.proto when "
            "the package is installed; run `pip install -e .` (make run and make test do it)"
        )
    if (
        proto.exists()
        and stamp.read_text().strip() != hashlib.sha256(proto.read_bytes()).hexdigest()
    ):
        raise ImportError(
            f"the gRPC code in {_HERE} was generated from another timeline.proto: run "
            "`pip install -e .` again (or `python -m timeline.rpc.codegen`)"
        )


_check_generated()
