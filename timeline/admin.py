"""timeline-admin: operator commands that must not run inside a request.

    timeline-admin migrate    build the store's indexes (MongoDB), waiting as long as it takes
    timeline-admin purge      remove expired entries once (floors first), as the service does

Reads the same settings as the service (configs/timeline.yaml, TIMELINE_* variables).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from timeline.errors import Unavailable
from timeline.settings import SettingsError, load_settings
from timeline.store import Purger, open_store, retention_ms


def migrate() -> int:
    """Prepare the store the settings name, with no deadline; 0 when it is ready. One line
    on stderr when it cannot be (documents that collide on (id, seq) name themselves)."""
    settings = dataclasses.replace(load_settings(), mongo_index_build_timeout_seconds=0)
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


def purge() -> int:
    """One pass of the purge the service runs every purge_interval_seconds: for a cron job
    while no service runs (nothing else removes expired entries). 0 when it ran."""
    settings = load_settings()
    store = open_store(settings)
    try:
        store.prepare()  # MongoDB: the purge finds expired entries by an index
        purger = Purger(store, retention_ms(settings), 1.0, lambda: int(time.time() * 1000))
        removed = purger.run_once(claimed=False)
        print(f"{store.backend} store: {removed} expired entries removed")
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="timeline-admin", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="build the store's indexes, without a deadline")
    commands.add_parser("purge", help="remove expired entries once, raising floors first")
    command = parser.parse_args(argv).command
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return migrate() if command == "migrate" else purge()
    except SettingsError as exc:
        print(f"timeline-admin: {exc}", file=sys.stderr)
    except Unavailable as exc:
        print(f"timeline-admin: {exc.message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
