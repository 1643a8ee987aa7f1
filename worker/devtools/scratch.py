"""Throwaway databases for benchmarks and tests: on a given server, else the one on
127.0.0.1:5432 when it answers, else an embedded one started for the occasion."""

from __future__ import annotations

import contextlib
import re
import secrets
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from worker.devtools.embedded import embedded_postgres
from worker.devtools.sql import queries

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def with_database(url: str, name: str) -> str:
    """The same server URL, naming another database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def server_answers(url: str) -> bool:
    try:
        connection = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await connection.close()
    return True


def database_statement(name: str, database: str) -> str:
    """`create_database` or `drop_database` for a generated name (never user input)."""
    if not re.fullmatch(r"[a-z0-9_]{1,63}", database):
        raise ValueError(f"not a generated database name: {database!r}")
    return queries()[name].replace("{database}", database)


async def run_admin(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def scratch_database(prefix: str, server: str | None = None) -> AsyncIterator[str]:
    """A new empty database, dropped on exit; yields its URL."""
    async with contextlib.AsyncExitStack() as stack:
        if server is None:
            if await server_answers(LOCAL_SERVER):
                server = LOCAL_SERVER
            else:
                data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{prefix}-pg-"))
                server = stack.enter_context(embedded_postgres(Path(data_dir)))
        name = f"{prefix}_{secrets.token_hex(4)}"
        await run_admin(server, database_statement("create_database", name))
        try:
            yield with_database(server, name)
        finally:
            await run_admin(server, database_statement("drop_database", name))
