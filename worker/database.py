"""The connection to PostgreSQL: opening and closing pools, bounding work on a silent server, and
turning driver failures into the worker's DatabaseError."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import AsyncIterator

import asyncpg

from worker.errors import ConfigError, DatabaseError, DatabaseTimeoutError, DataRefusedError
from worker.settings import PERCENT_ENCODE
from worker.sql import queries


@contextlib.asynccontextmanager
async def wrap_db_errors(doing: str) -> AsyncIterator[None]:
    """Turn driver and connection failures into a DatabaseError that says what was being done: a
    DataRefusedError when the server refused the data itself, which no retry changes."""
    try:
        yield
    except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:  # SQLSTATE 23, 22
        raise DataRefusedError(f"PostgreSQL refused the data while {doing}: {type(exc).__name__}: {exc}",
                               sqlstate=exc.sqlstate, constraint=exc.constraint_name) from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseError(f"PostgreSQL failed while {doing}: {type(exc).__name__}: {exc}") from exc
    except socket.gaierror as exc:
        # The setting is named, not the host: no part of the URL is shown (any part of it may hold
        # a piece of the password).
        raise DatabaseError(f"PostgreSQL could not be reached while {doing}: DATABASE_URL's host "
                            f"name does not resolve ({exc.strerror})") from exc
    except TimeoutError as exc:
        raise DatabaseTimeoutError(f"PostgreSQL did not answer in time while {doing}") from exc
    except OSError as exc:
        raise DatabaseError(f"PostgreSQL could not be reached while {doing}: {exc}") from exc


# Connections of a process's runs: each run holds one for its whole pull.
POOL_SIZE = 10
# How long closing a pool waits for the server to see its connections off before closing them.
POOL_CLOSE_WITHIN = 1.0


# A connection whose server has vanished without closing it (a failover, a lost host, a NAT that
# forgot it) is given up after about this many seconds of silence, instead of never: a run waiting
# for a statement's answer on it would otherwise hold its list (skipped as still running) until a
# restart. A server busy with a long statement still answers the kernel's probes.
DEAD_AFTER = 60.0


def _probing(dead_after: float) -> tuple[int, int, int]:
    """(idle seconds, seconds between probes, probes): silence is noticed within `dead_after`."""
    idle = max(int(dead_after / 3), 1)
    probes = 4
    return idle, max(int((dead_after - idle) / probes), 1), probes


def _server_gives_up_after(dead_after: float) -> dict[str, str]:
    # The server's side of a connection lost for good: its session, and the list's advisory lock
    # it holds, end as soon as the worker's would, not after the server's default two hours.
    idle, interval, probes = _probing(dead_after)
    return {"tcp_keepalives_idle": str(idle), "tcp_keepalives_interval": str(interval),
            "tcp_keepalives_count": str(probes), "tcp_user_timeout": str(int(dead_after * 1000))}


async def _notice_a_silent_server(dead_after: float, connection: asyncpg.Connection) -> None:
    """The worker's side: TCP keepalives and a user timeout, which libpq's `keepalives_*` and
    `tcp_user_timeout` parameters set and asyncpg has no parameters for (its transport is read
    for the socket, as its maintainers advise)."""
    transport = getattr(connection, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket: the server is on this host, and its end closes with its process
    idle, interval, probes = _probing(dead_after)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_after * 1000))


@contextlib.asynccontextmanager
async def open_pool(database_url: str, *, max_size: int = POOL_SIZE,
                    statement_timeout: float | None = None, answer_within: float | None = None,
                    dead_after: float = DEAD_AFTER) -> AsyncIterator[asyncpg.Pool]:
    """`answer_within`: how long a statement's answer is waited for (DATABASE_TIMEOUT) before it
    raises TimeoutError, on the worker's side. A proxy between the worker and the server (a
    service mesh's sidecar, a connection pooler) keeps answering the kernel's probes when the
    server behind it is lost, so only this notices that server's silence."""
    # No statement cache: each reconcile creates its own temporary tables, which would
    # invalidate cached plans, and an unnamed statement costs one parse per query.
    # temp_buffers can only be set before a session's first temporary table: a million staged
    # rows then stay in memory instead of going to disk and back. JIT compiling the diff costs
    # more (about 0.3 s) than it saves on these plans.
    async with wrap_db_errors("connecting"):
        try:
            pool = await asyncpg.create_pool(
                database_url, min_size=1, max_size=max_size, statement_cache_size=0, timeout=15,
                command_timeout=answer_within,
                init=functools.partial(_notice_a_silent_server, dead_after),
                server_settings={"application_name": "mailgun-sync", "temp_buffers": "256MB",
                                 "jit": "off", **_ends_statements_after(statement_timeout),
                                 **_server_gives_up_after(dead_after)})
        except (ValueError, TypeError, OverflowError, IndexError) as exc:
            # The settings checked the URL (check_database_url); what the driver still cannot parse
            # (its query) it quotes, and any part of a URL may hold a piece of the password: only
            # the kind of error is shown.
            problem = (f"the driver cannot use it ({type(exc).__name__}; check the host, port and "
                       f"query parameters); {PERCENT_ENCODE}")
            raise ConfigError("DATABASE_URL", problem) from None
    try:
        yield pool
    finally:
        # Closing politely waits for each server to answer; one a failover lost never does, and
        # closing fails over to terminating them.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pool.close(), POOL_CLOSE_WITHIN)


def _ends_statements_after(seconds: float | None) -> dict[str, str]:
    # The server's own limit: a connection given up on the client's side is only closed there, and
    # its session would go on waiting (for a lock, say) until it got what it waited for.
    return {} if seconds is None else {"statement_timeout": str(int(seconds * 1000))}


@contextlib.asynccontextmanager
async def connection_within(pool: asyncpg.Pool, within: float,
                            doing: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of `pool` for work that is over within `within` seconds whatever the server
    does, or raises DatabaseTimeoutError. A connection that has not answered in time is terminated:
    asyncpg's own query timeout sends a cancel request, and its release waits for that and for a
    reset, all on the silent server, forever on a connection a failover lost. So is one whose work
    was cancelled or failed otherwise than by the server's answer: it is not trusted again, and a
    terminated connection's release waits for nothing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    late = f"PostgreSQL did not answer within {within:g} s"
    async with wrap_db_errors(doing):
        try:
            connection = await pool.acquire(timeout=within)
        except TimeoutError:
            raise DatabaseTimeoutError(f"{late} (connecting)") from None
        timer = loop.call_at(deadline, connection.terminate)
        try:
            yield connection
        except BaseException as exc:
            if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError) and loop.time() >= deadline:
                raise DatabaseTimeoutError(f"{late} while {doing}") from None
            if not isinstance(exc, asyncpg.PostgresError):  # the server's refusal leaves it usable
                with contextlib.suppress(asyncpg.InterfaceError):
                    connection.terminate()
            raise
        finally:
            timer.cancel()
            # Its reset has what is left of the time: past it the connection is terminated, and
            # the work done stands.
            with contextlib.suppress(TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await pool.release(connection, timeout=max(deadline - loop.time(), 0.0))


# A COPY fed by a stream (the pull, page by page) is given this as its own timeout: asyncpg counts
# a COPY's whole length against it, Mailgun's time included, which is the pull's, not the
# server's. CopyWatch bounds the server's part instead.
STREAMED_COPY_TIMEOUT = 365 * 86400.0


class CopyWatch:
    """The time PostgreSQL keeps a streamed COPY waiting, bounded by `within` (DATABASE_TIMEOUT; None:
    not bounded): rows handed over and not taken (the server's flow control), or the COPY's answer
    after its last row. Past it the connection is terminated, and the COPY fails with a
    DatabaseTimeoutError. The stream's own waits (Mailgun's pages) do not count. The stream says
    whose turn it is, a page at a time (a row at a time would cost the pull):

        async with watch:  # CopyWatch(connection, within, doing)
            await connection.copy_records_to_table(..., records=rows, timeout=watch.timeout)

    where `rows` calls watch.server_turn() before handing over a page's rows and after its last
    page, and watch.stream_turn() before waiting for the next page.
    """

    def __init__(self, connection: asyncpg.Connection, within: float | None, doing: str) -> None:
        self._connection = connection
        self._within = within
        self._doing = doing
        self._waiting_since: float | None = None  # on the server, since
        self._stalled = False
        self._watchdog: asyncio.Task[None] | None = None
        self._task: asyncio.Task[object] | None = None  # the COPY's
        self.timeout = STREAMED_COPY_TIMEOUT

    def server_turn(self) -> None:
        self._waiting_since = time.monotonic()

    def stream_turn(self) -> None:
        self._waiting_since = None

    async def _watch(self, within: float) -> None:
        while True:
            await asyncio.sleep(min(1.0, within / 4))
            since = self._waiting_since
            if since is not None and time.monotonic() - since > within:
                self._stalled = True
                with contextlib.suppress(asyncpg.InterfaceError):
                    self._connection.terminate()
                # A COPY held by the server's flow control waits for asyncpg's leave to write,
                # which a closed connection never gives: the COPY's task is woken.
                assert self._task is not None
                self._task.cancel()
                return

    async def __aenter__(self) -> CopyWatch:
        self._task = asyncio.current_task()
        if self._within is not None:
            self._watchdog = asyncio.create_task(self._watch(self._within))
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        traceback: object) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            # Waited for without taking its cancellation for this task's: a stop arriving now
            # is this task's, and goes on.
            await asyncio.wait([self._watchdog])
        if not self._stalled:
            return
        assert self._task is not None
        if self._task.uncancel() > 0 and isinstance(exc, asyncio.CancelledError):
            return  # cancelled from outside as well: that stands
        raise DatabaseTimeoutError(
            f"PostgreSQL did not answer in time while {self._doing} (DATABASE_TIMEOUT)") from exc


async def ping(pool: asyncpg.Pool, within: float) -> None:
    """Return once PostgreSQL answers, or raise DatabaseError by `within` seconds whatever the
    server does (see connection_within)."""
    async with connection_within(pool, within, "checking the connection") as connection:
        await connection.fetchval(queries()["ping"])
