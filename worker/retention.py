"""Retention: the change log and the run records are kept SYNC_RETENTION_DAYS, then pruned; so
are removals carried out at Mailgun, though never before 30 days.

At 1,000 webhooks a second the change log grows by 86 million rows a day. Pruning deletes the
rows past the retention oldest first, `BATCH_ROWS` per statement, each statement a transaction of
its own: a DELETE takes no lock an INSERT waits for, so webhooks and runs keep writing, and no
batch holds its row locks for long. Nothing is rewritten; autovacuum makes the space reusable.
The newest run record of each (domain, list) and status is kept whatever its age.

One process prunes at a time (an advisory lock); another that finds it taken skips, so daemon
replicas and a CronJob never prune together.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from worker.database import wrap_db_errors
from worker.logs import get_logger
from worker.sql import queries

log = get_logger(__name__)

BATCH_ROWS = 10_000

# The tables pruned, each by its named query in sql/queries.sql. The queries share one shape (see
# the comment above `prune_changes`): a table joins with one such query, an index on its
# (time, id) and one entry here.
PRUNED_TABLES = (("changes", "prune_changes"), ("sync_runs", "prune_sync_runs"),
                 ("removals", "prune_done_removals"))

# Where the first batch of a table starts: before any row.
_START = (datetime(1, 1, 1, tzinfo=UTC), 0)


@dataclass(frozen=True, slots=True)
class TablePruned:
    table: str
    rows: int
    batches: int
    seconds: float
    # The longest single statement: the longest any deleted row stayed locked.
    longest_statement_s: float


@dataclass(frozen=True)
class PruneReport:
    retention_days: int
    # Rows older than this were pruned; None when nothing was (retention 0, or skipped).
    cutoff: datetime | None = None
    # Another process held the pruning lock: this one did nothing.
    skipped: bool = False
    tables: list[TablePruned] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    def as_json(self) -> dict[str, Any]:
        return {"retention_days": self.retention_days, "skipped": self.skipped,
                "cutoff": self.cutoff.isoformat() if self.cutoff else None, "rows": self.rows,
                "tables": [asdict(t) for t in self.tables]}


async def prune(pool: asyncpg.Pool, retention_days: int, *, batch_rows: int = BATCH_ROWS) -> PruneReport:
    """Delete every row past the retention from each of PRUNED_TABLES, a batch at a time."""
    if retention_days <= 0:
        return PruneReport(retention_days)
    async with wrap_db_errors("pruning past the retention"), pool.acquire() as db:
        if not await db.fetchval(queries()["try_lock_retention"]):
            log.info("retention_skipped", reason="another process is pruning")
            return PruneReport(retention_days, skipped=True)
        try:
            cutoff: datetime = await db.fetchval(queries()["retention_cutoff"], retention_days)
            report = PruneReport(retention_days, cutoff)
            for table, query in PRUNED_TABLES:
                report.tables.append(await _prune_table(db, table, queries()[query], cutoff, batch_rows))
        finally:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await db.fetchval(queries()["unlock_retention"])
    log.info("retention_pruned", retention_days=retention_days, cutoff=report.cutoff,
             **{t.table: t.rows for t in report.tables})
    return report


async def _prune_table(db: asyncpg.Connection, table: str, query: str, cutoff: datetime,
                       batch_rows: int) -> TablePruned:
    after_at, after_id = _START
    rows = batches = 0
    longest = 0.0
    started = time.perf_counter()
    while True:
        clock = time.perf_counter()
        batch = await db.fetchrow(query, cutoff, after_at, after_id, batch_rows)
        longest = max(longest, time.perf_counter() - clock)
        batches += 1
        rows += batch["removed"]
        if batch["found"] < batch_rows:
            break
        after_at, after_id = batch["last_at"], batch["last_id"]
    return TablePruned(table, rows, batches, round(time.perf_counter() - started, 3), round(longest, 4))


def render(report: PruneReport) -> str:
    if report.retention_days <= 0:
        return "SYNC_RETENTION_DAYS is 0: the change log and run records are kept; nothing pruned\n"
    if report.skipped or report.cutoff is None:
        return "skipped: another process is pruning\n"
    lines = [f"pruned {report.rows:,} rows older than {report.retention_days} days "
             f"(before {report.cutoff.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC)"]
    lines += [f"  {t.table:<10} {t.rows:>12,} rows  {t.batches:>7,} batches  {t.seconds:8.2f} s  "
              f"longest statement {1000 * t.longest_statement_s:.1f} ms" for t in report.tables]
    return "\n".join(lines) + "\n"
