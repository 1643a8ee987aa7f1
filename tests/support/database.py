"""Where the tests' PostgreSQL comes from: TEST_DATABASE_URL, else the server on 127.0.0.1:5432
when one answers, else an embedded server started for the run. Each run gets its own database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from worker.devtools.embedded import embedded_postgres
from worker.devtools.scratch import LOCAL_SERVER, database_statement, run_admin, server_answers, with_database
from worker.devtools.sql import queries


@dataclass(frozen=True)
class TestDatabase:
    url: str
    admin_url: str
    name: str


@contextlib.contextmanager
def _server() -> Iterator[str]:
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        yield given
    elif asyncio.run(server_answers(LOCAL_SERVER)):
        yield LOCAL_SERVER
    else:
        with tempfile.TemporaryDirectory(prefix="mailgun-sync-pg-") as data_dir, \
                embedded_postgres(Path(data_dir)) as url:
            yield url


@contextlib.contextmanager
def open_test_database() -> Iterator[TestDatabase]:
    with _server() as admin_url:
        name = f"mailgun_sync_test_{secrets.token_hex(4)}"
        asyncio.run(run_admin(admin_url, database_statement("create_database", name)))
        try:
            yield TestDatabase(url=with_database(admin_url, name), admin_url=admin_url, name=name)
        finally:
            asyncio.run(run_admin(admin_url, database_statement("drop_database", name)))


@contextlib.asynccontextmanager
async def icu_database(admin_url: str) -> AsyncIterator[str]:
    """A database of its own whose default collation is ICU's en-US (it sorts `a` before `B` and
    `_x` before `*`, unlike code-point order), dropped afterwards; skips the test on a server that
    cannot create one."""
    connection = await asyncpg.connect(admin_url, timeout=10)
    try:
        supported = await connection.fetchval(queries()["icu_databases_supported"])
    finally:
        await connection.close()
    if not supported:
        pytest.skip("this PostgreSQL cannot create an ICU en-US database (it needs 15 or later, "
                    "built with ICU); the collation tests need one")
    name = f"mailgun_sync_icu_{secrets.token_hex(4)}"
    await run_admin(admin_url, database_statement("create_database_icu", name))
    try:
        yield with_database(admin_url, name)
    finally:
        await run_admin(admin_url, database_statement("drop_database", name))
