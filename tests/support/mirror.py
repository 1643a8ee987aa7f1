"""Reading and arranging the mirror's tables directly, as an application (or a test) would."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from worker.records import SuppressionList

MIRROR_TABLES = ("bounces", "unsubscribes", "complaints", "allowlist", "sync_runs", "changes")


BACKFILL_TABLES = ("backfill_pages", "backfill_progress", "removals", "webhook_tokens",
                   "discovered_domains", "schedule", "last_runs")


async def empty_mirror(pool: asyncpg.Pool) -> None:
    # A TRUNCATE gives each table and index new files whether it held rows or not, which is most
    # of a test's set-up when all are truncated; most tests leave most tables empty.
    tables = (*MIRROR_TABLES, *BACKFILL_TABLES)
    holding = " UNION ALL ".join(f"SELECT '{t}' WHERE EXISTS (SELECT FROM mailgun.{t})" for t in tables)
    found = [row[0] for row in await pool.fetch(holding)]
    if found:
        await pool.execute("TRUNCATE " + ", ".join(f"mailgun.{t}" for t in found))


async def insert_row(pool: asyncpg.Pool, kind: SuppressionList | str, domain: str, address: str,
                     *, state: str = "pending", synced_at: datetime | None = None,
                     **data: Any) -> None:
    """Insert a row in a chosen state; `state="pending"` with no other options is exactly what an
    application's plain INSERT gives."""
    kind = SuppressionList.parse(str(kind))
    columns = {"domain": domain, kind.address_field: address, **data}
    if state != "pending" or synced_at is not None:
        columns.update(sync_state=state, synced_at=synced_at)
    names = ", ".join(columns)
    params = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    await pool.execute(
        f"INSERT INTO mailgun.{kind.value} ({names}) VALUES ({params})",
        *columns.values())


async def rows(pool: asyncpg.Pool, kind: SuppressionList | str) -> dict[str, dict[str, Any]]:
    """The mirror table as {address: row}."""
    kind = SuppressionList.parse(str(kind))
    column = kind.address_field
    found = await pool.fetch(f"SELECT * FROM mailgun.{kind.value} ORDER BY lower({column})")
    return {r[column]: dict(r) for r in found}


async def snapshot(pool: asyncpg.Pool) -> dict[str, list[tuple[Any, ...]]]:
    """Every mirror table, row for row, for byte-for-byte comparisons."""
    return {t: [tuple(r) for r in await pool.fetch(f"SELECT * FROM mailgun.{t} ORDER BY 1, 2")]
            for t in MIRROR_TABLES}


async def changes(pool: asyncpg.Pool) -> list[tuple[str, str, str]]:
    found = await pool.fetch("SELECT list, address, action FROM mailgun.changes ORDER BY id")
    return [(r["list"], r["address"], r["action"]) for r in found]
