"""Script calls on one connection, pipelined: sent in one write, replies read in order.

Shared by every topology. The send and the reading are two steps, so that a cluster can
send to all its nodes before it reads from any (one round trip of wall time). What each
reply means for the caller:

- the script's reply: it ran;
- NotRun: it did not run (no connection could be had, the server refused the command);
- a redirection (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) as the exception redis-py parses it
  into: it did not run, the cluster module sends it again where it belongs;
- any other exception (a timeout, a dropped connection): the outcome is unknown. Once a
  connection fails every reply not read yet is unknown, and the connection is dropped.

A script the server does not know (NOSCRIPT: a restart, a failover, SCRIPT FLUSH) did not
run: it is loaded on that connection and its calls are sent once more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import NoScriptError

from timeline.allocator import Call, NotRun, Script

__all__ = ["REDIRECTS", "Batch", "NotRun", "command", "run"]

#: Replies meaning the call did not run and belongs elsewhere or later (cluster only).
REDIRECTS: tuple[type[Exception], ...] = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


class Batch:
    """Calls sent on one connection of `pool`; `finish()` reads their replies."""

    def __init__(self, pool: redis.ConnectionPool, calls: Sequence[Call], asking: bool = False):
        self._pool = pool
        self._calls = list(calls)
        self._asking = asking  # an ASK redirection: each call is preceded by ASKING
        self._connection: Any = None
        self._failed: BaseException | None = None
        self._sent = False

    def start(self) -> Batch:
        """Send every call (nothing is read yet)."""
        try:
            self._connection = self._pool.get_connection()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._failed = NotRun.of(exc, "no connection: ")
            return self
        self._send(self._calls)
        return self

    def _send(self, calls: Sequence[Call]) -> None:
        commands: list[tuple[Any, ...]] = []
        for call in calls:
            if self._asking:
                commands.append(("ASKING",))
            commands.append(("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args))
        try:
            self._connection.send_packed_command(self._connection.pack_commands(commands))
            self._sent = True
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._failed = exc  # some of it may have gone out: unknown

    def finish(self) -> list[Any]:
        """Each call's reply, or the exception that stands for it (see the module's text).
        Never raises: whatever goes wrong, the connection goes back to the pool either in
        step (every reply read) or dropped."""
        if self._connection is None:
            assert self._failed is not None
            return [self._failed] * len(self._calls)
        replies: list[Any] = []
        try:
            replies = self._read(len(self._calls))
            unknown_script = [
                i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)
            ]
            if unknown_script and self._failed is None:
                self._load({self._calls[i].script for i in unknown_script})
                self._send([self._calls[i] for i in unknown_script])
                for i, reply in zip(unknown_script, self._read(len(unknown_script)), strict=True):
                    replies[i] = reply
        except Exception as exc:
            # Anything unexpected (a SCRIPT LOAD that timed out, a reply that cannot be
            # parsed): what was not read yet is unknown, and the connection is dropped.
            self._failed = exc
            replies += [exc] * (len(self._calls) - len(replies))
            replies = [exc if isinstance(r, NoScriptError) else r for r in replies]
        finally:
            if self._failed is not None:
                self._connection.disconnect()
            self._pool.release(self._connection)
        return replies

    def _load(self, scripts: set[Script]) -> None:
        """SCRIPT LOAD each script on this connection (a NOSCRIPT reply: it did not run)."""
        for script in scripts:
            self._connection.send_command("SCRIPT", "LOAD", script.source)
            if self._connection.read_response() != script.sha.encode():  # pragma: no cover
                raise redis.ResponseError(f"SCRIPT LOAD of {script.name} returned another SHA")

    def _read(self, count: int) -> list[Any]:
        replies: list[Any] = []
        for _ in range(count):
            if self._failed is not None:
                replies.append(self._failed)
                continue
            if self._asking:
                try:
                    self._connection.read_response()  # ASKING's +OK
                except redis.ResponseError:
                    pass
                except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                    self._failed = exc
                    replies.append(exc)
                    continue
            try:
                replies.append(self._connection.read_response())
            except NoScriptError as exc:
                replies.append(exc)
            except REDIRECTS as exc:
                replies.append(exc)
            except redis.ResponseError as exc:
                # The server refused it (OOM, READONLY, MISCONF, a script's own error): the
                # script changed nothing (lua/allocate.lua undoes a partial run itself).
                replies.append(NotRun.of(exc))
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self._failed = exc
                replies.append(exc)
        return replies


def command(pool: redis.ConnectionPool, *args: Any) -> Any:
    """One command that is safe to repeat (GET), on a pooled connection: its reply, or the
    redis error it raised (the connection is dropped unless the reply was an error reply,
    after which it is still in step)."""
    connection: Any = pool.get_connection()
    try:
        connection.send_command(*args)
        return connection.read_response()
    except redis.ResponseError:
        raise
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def run(pool: redis.ConnectionPool, calls: Sequence[Call]) -> list[Any]:
    """Send the calls on one connection and read their replies."""
    return Batch(pool, calls).start().finish()
