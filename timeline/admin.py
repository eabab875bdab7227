"""timeline-admin: operator commands that must not run inside a request.

    timeline-admin migrate    build the store's indexes (MongoDB), waiting as long as it takes

Reads the same settings as the service (configs/timeline.yaml, TIMELINE_* variables).
"""

from __future__ import annotations

import argparse
import logging
import sys

from timeline.errors import Unavailable
from timeline.settings import SettingsError, load_settings
from timeline.store import open_store, retention_ms


def migrate() -> int:
    """Prepare the store the settings name; 0 when it is ready."""
    settings = load_settings()
    store = open_store(settings)
    try:
        if store.backend == "mongo":
            print(
                f"building the indexes of MongoDB database {settings.mongo_database!r}; on "
                "existing data this can take a long while"
            )
        store.prepare()
        retention = {kind.value: ms // 1000 for kind, ms in retention_ms(settings).items()}
        print(f"{store.backend} store ready (retention in seconds: {retention})")
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="timeline-admin", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="build the store's indexes, without a deadline")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return migrate()
    except SettingsError as exc:
        print(f"timeline-admin: {exc}", file=sys.stderr)
    except Unavailable as exc:
        print(f"timeline-admin: {exc.message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
