"""Apply sql/migrations in order, each once, under an advisory lock so concurrent starts are safe."""

from __future__ import annotations

import asyncpg

from worker.database import wrap_db_errors
from worker.grants import apply_app_grants
from worker.logs import get_logger
from worker.sql import migrations, queries

log = get_logger(__name__)


async def migrate(pool: asyncpg.Pool, *, app_role: str | None = None) -> list[int]:
    """Bring the schema up to date; returns the versions applied now (none when current). With
    `app_role`, then grant that role exactly what sql/roles.sql gives applications, in the same
    transaction, so a table a migration added is covered as soon as it exists."""
    applied_now: list[int] = []
    async with wrap_db_errors("migrating the schema"), pool.acquire() as connection, \
            connection.transaction():
        await connection.execute(queries()["lock_migrations"])
        await connection.execute(queries()["create_migrations_table"])
        done = {row["version"] for row in await connection.fetch(queries()["applied_migrations"])}
        for migration in migrations():
            if migration.version in done:
                continue
            await connection.execute(migration.sql)
            await connection.execute(queries()["record_migration"], migration.version, migration.name)
            applied_now.append(migration.version)
            log.info("migration_applied", version=migration.version, name=migration.name)
        if app_role is not None:
            await apply_app_grants(connection, app_role)
            log.info("app_role_granted", role=app_role)
    return applied_now


async def pending_migrations(pool: asyncpg.Pool) -> list[int]:
    """Versions not yet applied; every version when the schema is absent."""
    async with wrap_db_errors("reading the schema version"), pool.acquire() as connection:
        exists = await connection.fetchval(queries()["migrations_table_exists"])
        done = {row["version"] for row in await connection.fetch(queries()["applied_migrations"])} \
            if exists else set()
    return [m.version for m in migrations() if m.version not in done]
