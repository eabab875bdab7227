"""The lock files of requirements/ against pyproject.toml, and against the environment the
tests run in (`make lock` writes them; the Makefile, .ci/run and the Dockerfile install
nothing else).

- dev.txt: what `make test` installs, and so exactly what this environment holds.
- runtime.txt: what `make run` and the image install: dev.txt's versions, runtime only.
- lowest.txt: the lowest versions pyproject.toml's ranges allow (`make smoke` serves on them),
  so each lower bound there is a release that was installed and served.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: str) -> dict[str, Version]:
    """The lock's name == version lines that apply to this interpreter and platform."""
    found: dict[str, Version] = {}
    lines = (LOCKS / lock).read_text().splitlines()
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        if not line[:1].isalnum():
            continue  # a hash, a comment
        requirement = Requirement(line.rstrip(" \\"))
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        (spec,) = requirement.specifier
        assert spec.operator == "==", line
        assert following.strip().startswith("--hash=sha256:"), line
        found[canonical(requirement.name)] = Version(spec.version)
    return found


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(*extras: str) -> list[Requirement]:
    """pyproject.toml's runtime dependencies, its build requirements and these extras (the
    project's own extras, such as dev's timeline[bench], are followed)."""
    project = pyproject()["project"]
    build = pyproject()["build-system"]
    assert isinstance(project, dict)
    assert isinstance(build, dict)
    found = [Requirement(text) for text in [*project["dependencies"], *build["requires"]]]
    wanted = list(extras)
    while wanted:
        for text in project["optional-dependencies"][wanted.pop()]:
            requirement = Requirement(text)
            if canonical(requirement.name) == "timeline":
                wanted.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def test_this_environment_holds_exactly_the_dev_lock() -> None:
    locked = pins("dev.txt")
    installed = {
        canonical(dist.metadata["Name"]): Version(dist.version)
        for dist in metadata.distributions(path=[p for p in sys.path if "site-packages" in p])
    }
    installed.pop("timeline")  # the project itself, installed from the checkout
    assert installed == locked, "make test installs requirements/dev.txt: run it again"


@pytest.mark.parametrize(("lock", "extras"), [("dev.txt", ("dev",)), ("runtime.txt", ())])
def test_every_requirement_is_locked_within_its_range(lock: str, extras: tuple[str, ...]) -> None:
    locked = pins(lock)
    for requirement in requirements(*extras):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonical(requirement.name)
        assert name in locked, f"{name} is not in requirements/{lock}: run make lock"
        assert locked[name] in requirement.specifier, f"{name}: run make lock"


def test_the_runtime_lock_has_the_dev_lock_s_versions() -> None:
    dev, runtime = pins("dev.txt"), pins("runtime.txt")
    assert runtime
    assert {name: dev.get(name) for name in runtime} == runtime


def test_each_lower_bound_is_the_release_the_lowest_lock_installs() -> None:
    lowest = pins("lowest.txt")
    for requirement in requirements():
        bounds = [s for s in requirement.specifier if s.operator in (">=", "==")]
        assert bounds, f"{requirement} has no lower bound"
        (bound,) = bounds
        name = canonical(requirement.name)
        assert lowest[name] == Version(bound.version), (
            f"{name}: pyproject.toml says {bound}, the lowest release that resolves is "
            f"{lowest[name]}: raise the bound to it (make smoke serves on it)"
        )


def test_the_build_input_of_the_lock_is_pyproject_s() -> None:
    build = pyproject()["build-system"]
    assert isinstance(build, dict)
    lines = [line for line in (LOCKS / "build.in").read_text().splitlines() if line[:1].isalnum()]
    assert lines[: len(build["requires"])] == build["requires"], "run make lock"
