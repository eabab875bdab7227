"""What the service needs of a dependency beyond its public interface, checked at boot.

timeline/worker.py builds on gunicorn's gthread worker and its HTTP parser: the selector
loop's `wait_for_and_dispatch_events`, `method_queue`, `tpool` and `_accepting`, the
parser's `_expected_100_continue`, and error classes such as `InvalidChunkExtension`. None
of them is public, so the worker runs only on the gunicorn releases it was tested with:
from 25.3 (the first that has every one of them; `make smoke` serves on it) up to the last
major release tested (CI serves on the lock's). The same range is pyproject.toml's, and a
test keeps the two equal.
"""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

#: The gunicorn releases the worker supports (pre-releases within it included).
GUNICORN_RANGE = ">=25.3,<28"
_SUPPORTED = SpecifierSet(GUNICORN_RANGE, prereleases=True)


class Unsupported(RuntimeError):
    """A dependency's installed release is outside what the service was tested with."""


def check_gunicorn(version: str | None = None) -> None:
    """Raise Unsupported, with one line naming the supported range, unless the installed
    gunicorn (or `version`) is in it."""
    found = metadata.version("gunicorn") if version is None else version
    try:
        supported = Version(found) in _SUPPORTED
    except InvalidVersion:
        supported = False
    if not supported:
        raise Unsupported(
            f"timeline's HTTP worker needs gunicorn {GUNICORN_RANGE} (it builds on gthread's "
            f"internals), but gunicorn {found} is installed"
        )
