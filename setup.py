"""The build step pyproject.toml cannot declare: the gRPC code, generated from
timeline/rpc/v1/timeline.proto whenever the package is built or installed.

Everything else (metadata, dependencies, packages) is in pyproject.toml. grpcio-tools is a
build requirement there, so pip installs it in the isolated build environment only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _codegen():  # type: ignore[no-untyped-def]
    """timeline/rpc/codegen.py, loaded by its path: the package is not importable yet."""
    path = Path(__file__).resolve().parent / "timeline" / "rpc" / "codegen.py"
    spec = importlib.util.spec_from_file_location("_timeline_codegen", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPy(build_py):
    """build_py, with the gRPC code generated first.

    An editable install (`pip install -e .`, what `make run` and `make test` do) runs this
    with editable_mode set: the code is generated into the source tree, where the package
    is imported from. A wheel gets it in its build directory, the source tree untouched.
    """

    def run(self) -> None:
        codegen = _codegen()
        if self.editable_mode:
            codegen.generate()
            super().run()
        else:
            super().run()
            codegen.generate(Path(self.build_lib))


setup(cmdclass={"build_py": BuildPy})
