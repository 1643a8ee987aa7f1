"""Migrations on databases of their own: applied in order from empty, each once, also when two
processes start migrating the same database at the same moment."""

from __future__ import annotations

import asyncio

import asyncpg

from worker.database import open_pool
from worker.migrate import migrate, pending_migrations
from worker.sql import migrations, queries

EVERY_VERSION = [m.version for m in migrations()]
MIRROR_TABLES = ("bounces", "unsubscribes", "complaints", "sync_runs", "changes")


async def applied_versions(pool: asyncpg.Pool) -> list[tuple[int, str]]:
    found = await pool.fetch("SELECT version, name FROM mailgun.schema_migrations ORDER BY version")
    return [(r["version"], r["name"]) for r in found]


async def waiting_for_advisory_locks(connection: asyncpg.Connection) -> int:
    count: int = await connection.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
    return count


async def until_both_wait(connection: asyncpg.Connection) -> None:
    for _ in range(1000):
        if await waiting_for_advisory_locks(connection) >= 2:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the two migrations never both waited for the lock")


def test_the_first_migration_is_version_1_and_versions_ascend():
    assert EVERY_VERSION[0] == 1
    assert sorted(set(EVERY_VERSION)) == EVERY_VERSION


async def test_migrate_from_empty_applies_every_migration_then_a_second_migrate_is_a_no_op(
        empty_database_url):
    async with open_pool(empty_database_url, max_size=1) as pool:
        assert await pending_migrations(pool) == EVERY_VERSION

        assert await migrate(pool) == EVERY_VERSION
        assert await pending_migrations(pool) == []
        recorded = await applied_versions(pool)
        assert recorded == [(m.version, m.name) for m in migrations()]
        assert recorded[0] == (1, "create_mirror")
        for table in MIRROR_TABLES:
            assert await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", f"mailgun.{table}"), table

        assert await migrate(pool) == []
        assert await applied_versions(pool) == recorded


async def test_migrate_leaves_existing_rows_alone_when_nothing_is_pending(empty_database_url):
    async with open_pool(empty_database_url, max_size=1) as pool:
        await migrate(pool)
        await pool.execute(
            "INSERT INTO mailgun.bounces (domain, address) VALUES ('mg.example.com', 'a@example.com')")
        assert await migrate(pool) == []
        assert await pool.fetchval("SELECT count(*) FROM mailgun.bounces") == 1


async def test_two_concurrent_migrations_of_an_empty_database_both_succeed_and_apply_once(
        empty_database_url):
    """A third connection holds the migration lock until both migrations are waiting for it, so
    they really do start together."""
    async with open_pool(empty_database_url, max_size=1) as first, \
            open_pool(empty_database_url, max_size=1) as second:
        blocker = await asyncpg.connect(empty_database_url, timeout=10)
        try:
            holding = blocker.transaction()
            await holding.start()
            await blocker.execute(queries()["lock_migrations"])
            both = asyncio.gather(migrate(first), migrate(second))
            await until_both_wait(blocker)
            await holding.rollback()
            results = await both
        finally:
            await blocker.close()

        assert sorted(results) == [[], EVERY_VERSION]
        assert [version for version, _ in await applied_versions(first)] == EVERY_VERSION
        assert await pending_migrations(second) == []
