"""Every database operation of the worker, by name. The SQL itself lives in sql/queries.sql.

One reconcile of one (domain, list) runs on one connection: it holds the list's advisory lock,
streams the pull into a session-private staging table, and diffs it in SQL, so the list never
lives whole in Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from worker.database import CopyWatch, wrap_db_errors
from worker.errors import DatabaseTimeoutError
from worker.records import ListRef, Page, Record, StagingRow, SuppressionList
from worker.runs import RunCounts, RunStatus
from worker.sql import queries

# The data columns of each mirror table, the ones Mailgun owns, each with the staging column it is
# read from (the allowlist's `type` and `reason` arrive in staging's `code` and `error`).
# Identifiers only: they fill the {cols}-style placeholders of sql/queries.sql.
DATA_COLUMNS: dict[SuppressionList, tuple[tuple[str, str], ...]] = {
    SuppressionList.BOUNCES: (("code", "code"), ("error", "error"), ("created_at", "created_at")),
    SuppressionList.UNSUBSCRIBES: (("tags", "tags"), ("created_at", "created_at")),
    SuppressionList.COMPLAINTS: (("created_at", "created_at"),),
    SuppressionList.ALLOWLIST: (("type", "code"), ("reason", "error"), ("created_at", "created_at")),
}
MIRRORED_LISTS = tuple(DATA_COLUMNS)
# Ending a list's session takes milliseconds; past this its connection is closed instead.
SESSION_END_WITHIN = 10.0

_PLACEHOLDER = re.compile(r"\{(table|list|cols|r_cols|m_cols|set_cols|address|address_key)\}")


@functools.cache
def list_query(name: str, kind: SuppressionList) -> str:
    """The named query for one list: its `NAME@list` variant if any, placeholders filled."""
    text = queries().get(f"{name}@{kind.value}") or queries()[name]
    pairs = DATA_COLUMNS[kind]
    address = kind.address_field
    values = {
        "table": f"mailgun.{kind.value}",
        "list": kind.value,
        "cols": ", ".join(c for c, _ in pairs),
        "r_cols": ", ".join(f"r.{s}" for _, s in pairs),
        "m_cols": ", ".join(f"m.{c}" for c, _ in pairs),
        "set_cols": ", ".join(f"{c} = r.{s}" for c, s in pairs),
        "address": address,
        "address_key": f"{address}_key",
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


@dataclass(frozen=True, slots=True)
class Plan:
    """What applying a complete pull would change."""

    inserts: int
    updates: int
    removals: int
    synced_rows: int
    adoptions: int
    pushes: int
    requeues: int


@dataclass(frozen=True, slots=True)
class Applied:
    inserted: int
    updated: int
    removed: int
    adopted: int


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    last_address: str
    pages: int
    records: int
    started_at: datetime


@dataclass(frozen=True, slots=True)
class PendingRow:
    """A local addition waiting to be pushed, with the row version it was read at."""

    record: Record
    version: str


@dataclass(frozen=True, slots=True)
class QueuedRemoval:
    """A deletion at Mailgun an application asked for: a whole record, or one unsubscribe tag."""

    id: int
    address: str
    key: str
    tag: str | None
    removed_at: datetime


_COPY_COLUMNS = ["key", "address", "code", "error", "created_at", "tags", "skipped"]


@dataclass(frozen=True, slots=True)
class Staged:
    """What a pull staged: the records the mirror takes, and those it cannot hold (skipped)."""

    records: int
    skipped: int


class RepeatWatch:
    """Tells, without holding the list in memory, whether a pull may have listed an address twice.

    Mailgun lists records in code-point order, so an exact repeat (an overlapping page, the legacy
    API's one row per unsubscribe tag) is adjacent to its twin, and of two ASCII addresses equal
    but for case, the one with an upper-case letter where they first differ comes first. So it is
    enough to remember the previous key and the keys of addresses that are not all lower-case
    (few). A non-ASCII address, whose key only PostgreSQL computes, makes it ask the database.
    """

    def __init__(self, *, ranged: bool = False) -> None:
        self.count = 0
        self.possible = False
        # Pages of parallel ranges interleave, so "previous" means nothing; but each range was
        # checked strictly increasing, so only case twins (across ranges) can repeat a key.
        self._ranged = ranged
        self._previous: str | None = None
        self._cased: set[str] = set()

    def see(self, rows: Sequence[StagingRow]) -> None:
        if self.possible:
            return
        if self._ranged:
            self.possible = any(key is None or key != address for key, address, *_ in rows)
            return
        previous, cased = self._previous, self._cased
        for key, address, *_ in rows:
            if key is None or key == previous or (cased and key in cased):
                self.possible = True
                return
            if key != address:
                cased.add(key)
            previous = key
        self._previous = previous


def _pending_record(kind: SuppressionList, row: asyncpg.Record) -> Record:
    if kind is SuppressionList.BOUNCES:
        return Record(row["address"], row["created_at"], code=row["code"], error=row["error"])
    if kind is SuppressionList.UNSUBSCRIBES:
        return Record(row["address"], row["created_at"], tags=tuple(row["tags"]))
    if kind is SuppressionList.ALLOWLIST:
        return Record(row["address"], row["created_at"], entry_type=row["type"], reason=row["reason"])
    return Record(row["address"], row["created_at"])


class ListSession:
    """One (domain, list) on one connection, with its advisory lock held."""

    def __init__(self, connection: asyncpg.Connection, ref: ListRef, *,
                 answer_within: float | None = None) -> None:
        """`answer_within`: DATABASE_TIMEOUT, which the pool's connections apply to each statement
        and the pull's streamed COPY to the server's part of it (CopyWatch)."""
        self._db = connection
        self.ref = ref
        self._answer_within = answer_within

    @property
    def domain(self) -> str:
        return self.ref.domain

    @property
    def kind(self) -> SuppressionList:
        return self.ref.list

    def _q(self, name: str) -> str:
        return list_query(name, self.kind)

    async def database_now(self) -> datetime:
        """The database's clock: row times are compared with it, never with this machine's."""
        async with wrap_db_errors("reading the clock"):
            moment: datetime = await self._db.fetchval(queries()["database_now"])
        return moment

    async def stage(self, pages: AsyncGenerator[Page, None], *, ranged: bool = False,
                    removed_first: Sequence[QueuedRemoval] = ()) -> Staged:
        """Stream every page into the staging table in one COPY; returns what it staged.

        If the pages raise, the COPY is abandoned and the error propagates: a partial pull leaves
        nothing staged. `removed_first` (a dry run's) are taken out of the list as Mailgun would
        list it had they been carried out first, before repeats are merged.
        """
        repeats = RepeatWatch(ranged=ranged)
        skipped = 0
        watch = CopyWatch(self._db, self._answer_within, f"staging {self.ref}")

        async def rows() -> AsyncIterator[StagingRow]:
            nonlocal skipped
            async for page in pages:
                repeats.see(page.rows)
                repeats.count += page.held
                skipped += len(page.skipped)
                watch.server_turn()  # a page's rows are handed over: the server must take them
                for row in page.rows:
                    yield row
                watch.stream_turn()
            watch.server_turn()  # the COPY's answer

        # Closed at once if the COPY fails, so no page request is left running in the background.
        async with contextlib.aclosing(pages), wrap_db_errors(f"staging {self.ref}"):
            await self._db.execute(queries()["create_staging"])
            # One COPY for the whole pull: a COPY per page would cost a few round trips each.
            async with watch:
                await self._db.copy_records_to_table("staging", records=rows(), columns=_COPY_COLUMNS,
                                                     timeout=watch.timeout)
            taken = await self._take_out(removed_first) if removed_first else Staged(0, 0)
            await self._finish_staging(maybe_repeats=repeats.possible)
        return Staged(repeats.count - taken.records, skipped - taken.skipped)

    async def _take_out(self, removals: Sequence[QueuedRemoval]) -> Staged:
        """The staged records these removals would take away at Mailgun (records deleted whole,
        unsubscribes left without tags), taken out; returns how many."""
        q = queries()
        whole = [r.address for r in removals if r.tag is None]
        tags = [r for r in removals if r.tag is not None]
        row = await self._db.fetchrow(q["dry_run_remove_staged"], whole)
        records, skipped = row["records"], row["skipped"]
        if tags:
            await self._db.execute(q["dry_run_drop_staged_tags"], [r.address for r in tags],
                                   [r.tag for r in tags])
            row = await self._db.fetchrow(q["dry_run_remove_untagged"])
            records, skipped = records + row["records"], skipped + row["skipped"]
        return Staged(records, skipped)

    async def other_spellings(self, removals: Sequence[QueuedRemoval]) -> int:
        """For a dry run: the staged records of the same mailboxes as these removals (deleted
        whole, before the pull) under another spelling, older than the removal, which a run
        deletes in turn once the removal is carried out."""
        whole = [r for r in removals if r.tag is None]
        if not whole:
            return 0
        async with wrap_db_errors(f"reading the pull of {self.ref}"):
            found: int = await self._db.fetchval(
                queries()["dry_run_other_spellings"], [r.key for r in whole],
                [r.address for r in whole], [r.removed_at for r in whole])
        return found

    async def _finish_staging(self, *, maybe_repeats: bool) -> None:
        if maybe_repeats and await self._db.fetchval(queries()["staging_has_duplicates"]):
            await self._db.execute(queries()["dedupe_staging"])
        await self._db.execute(queries()["analyze_staging"])

    async def pivots(self, ranges: int, *, sample_rows: int = 5000) -> list[str]:
        """Addresses that cut the mirror's part of the list into `ranges` parts of about equal
        size, from a sample of the table; none when the list is too small to be worth it."""
        async with wrap_db_errors(f"sampling {self.ref}"):
            rows = await self._db.fetchval(self._q("count_rows"), self.domain)
            if ranges < 2 or rows < ranges * 1000:
                return []
            percent = min(100.0, 100.0 * sample_rows / rows)
            sample = sorted({r["address"] for r in await self._db.fetch(
                self._q("sample_addresses"), self.domain, percent)})
        if len(sample) < ranges:
            return []
        return [sample[len(sample) * i // ranges] for i in range(1, ranges)]

    # ---- local removals, sent to Mailgun ------------------------------------------------

    async def queued_removals(self) -> list[QueuedRemoval]:
        async with wrap_db_errors(f"reading removals of {self.ref}"):
            found = await self._db.fetch(queries()["queued_removals"], self.domain, self.kind.value)
        return [QueuedRemoval(r["id"], r["address"], r["address_key"], r["tag"] or None, r["removed_at"])
                for r in found]

    async def count_synced(self) -> int:
        async with wrap_db_errors(f"counting {self.ref}"):
            synced: int = await self._db.fetchval(self._q("count_synced"), self.domain)
        return synced

    async def removals_sending(self, removals: Sequence[QueuedRemoval]) -> list[QueuedRemoval]:
        """Write down that these DELETEs are about to leave; the ones still queued, to be sent."""
        async with wrap_db_errors(f"noting removals of {self.ref} sent"):
            still = {r["id"] for r in await self._db.fetch(queries()["removals_sending"],
                                                           [r.id for r in removals])}
        return [r for r in removals if r.id in still]

    async def removals_done(self, run_id: uuid.UUID, removals: Sequence[QueuedRemoval],
                            not_found: Collection[int] = ()) -> None:
        """Mailgun carried these out (`not_found`: the ids it answered "not found"): record them,
        and send back any row a newer webhook wrote while they were in flight (a DELETE that found
        a record may have removed the webhook's at Mailgun)."""
        if not removals:
            return
        found = [r for r in removals if r.id not in not_found]
        async with wrap_db_errors(f"recording removals of {self.ref}"), \
                self._db.transaction():
            await self._db.execute(queries()["mark_worker_writes"])
            await self._db.execute(queries()["removals_done"], run_id, self.domain, self.kind.value,
                                   [r.id for r in removals], [r.address for r in removals],
                                   [r.tag or "" for r in removals], [r.removed_at for r in removals],
                                   list(not_found))
            await self._db.execute(self._q("resend_after_removal"), self.domain,
                                   [r.address for r in found], [r.tag or "" for r in found])

    async def removal_failed(self, removal: int, why: str) -> None:
        async with wrap_db_errors(f"noting a failed removal of {self.ref}"):
            await self._db.execute(queries()["removal_failed"], removal, why)

    # ---- a resumable backfill: pages committed one by one, with their cursor ------------------

    async def backfill_progress(self) -> BackfillProgress | None:
        async with wrap_db_errors(f"reading backfill progress of {self.ref}"):
            row = await self._db.fetchrow(queries()["backfill_progress"], self.domain, self.kind.value)
        return BackfillProgress(**dict(row)) if row else None

    async def backfill_page(self, page: Page) -> None:
        """Commit one page and the cursor after it together: a kill loses at most this page."""
        rows = [(self.domain, self.kind.value, *row) for row in page.rows]
        # PostgreSQL text cannot hold a NUL: then the cursor stays at the page's last held record
        # (a resume reads a few records again), or where it was.
        cursor = page.last_address if "\x00" not in page.last_address else \
            (page.rows[-1][1] if page.rows else None)
        async with wrap_db_errors(f"saving a backfill page of {self.ref}"), \
                self._db.transaction():
            await self._db.copy_records_to_table(
                "backfill_pages", schema_name="mailgun", records=rows,
                columns=["domain", "list", *_COPY_COLUMNS])
            if cursor is not None:
                await self._db.execute(queries()["backfill_save_progress"], self.domain,
                                       self.kind.value, cursor, page.held)

    async def stage_backfill(self) -> Staged:
        """Stage a completed backfill's pages as if they had been pulled in one go. The skipped
        count is of the placeholders kept with the pages (records whose address fits the mirror)."""
        async with wrap_db_errors(f"staging the backfill of {self.ref}"):
            await self._db.execute(queries()["create_staging"])
            row = await self._db.fetchrow(queries()["backfill_stage"], self.domain, self.kind.value)
            await self._finish_staging(maybe_repeats=True)
        return Staged(row["records"], row["skipped"])

    async def backfill_overtaken(self, started: datetime) -> bool:
        async with wrap_db_errors(f"checking the backfill of {self.ref}"):
            overtaken: bool = await self._db.fetchval(queries()["backfill_overtaken"], self.domain,
                                                      self.kind.value, started)
        return overtaken

    async def clear_backfill(self) -> None:
        async with wrap_db_errors(f"clearing the backfill of {self.ref}"):
            await self._db.execute(queries()["backfill_clear"], self.domain, self.kind.value)

    async def plan(self, pull_started: datetime) -> Plan:
        """Diff the staged list against the mirror (one full join) and count what it would do."""
        async with wrap_db_errors(f"planning {self.ref}"):
            await self._db.execute(queries()["raise_work_mem"])
            await self._db.execute(self._q("build_diff"), self.domain, pull_started)
            await self._db.execute(queries()["analyze_diff"])
            row = dict(await self._db.fetchrow(self._q("plan"), self.domain))
            if self.kind is SuppressionList.UNSUBSCRIBES:
                row["pushes"] += await self._db.fetchval(queries()["tag_pushes"], self.domain)
        return Plan(**row)

    async def apply(self, run_id: uuid.UUID, pull_started: datetime, *, remove: bool,
                    requeue: bool = False) -> Applied:
        """Apply the complete pull in one transaction: adopt, update, insert, requeue removals
        (only when the plan has some: the removals table may be large), then (unless guarded)
        remove."""
        async with wrap_db_errors(f"applying the pull of {self.ref}"), \
                self._db.transaction():
            await self._db.execute(queries()["mark_worker_writes"])
            adopted = await self._db.fetchval(self._q("adopt"), self.domain, run_id, pull_started)
            updated = await self._db.fetchval(self._q("update_changed"), self.domain, run_id, pull_started)
            inserted = await self._db.fetchval(self._q("insert_remote_only"), self.domain, run_id)
            if requeue:
                await self._db.execute(self._q("requeue_removals"), self.domain)
            removed = 0
            if remove:
                removed = await self._db.fetchval(
                    self._q("remove_vanished"), self.domain, run_id, pull_started)
        return Applied(inserted=inserted, updated=updated, removed=removed, adopted=adopted)

    async def pending(self, batch_size: int, pull_started: datetime) -> AsyncIterator[list[PendingRow]]:
        """Pending rows older than the pull, in key order, a batch at a time, read fresh each time."""
        after = ""
        while True:
            async with wrap_db_errors(f"reading pending {self.ref}"):
                rows = await self._db.fetch(self._q("select_pending"), self.domain, after, batch_size,
                                            pull_started)
            if not rows:
                return
            yield [PendingRow(_pending_record(self.kind, row), row["version"]) for row in rows]
            after = rows[-1]["address_key"]

    async def planned_pushes(self, batch_size: int) -> AsyncIterator[list[PendingRow]]:
        """The pending rows the diff would push, in key order, a batch at a time (a dry run's)."""
        after = ""
        while True:
            async with wrap_db_errors(f"reading planned pushes of {self.domain} {self.kind.value}"):
                rows = await self._db.fetch(self._q("select_planned_pushes"), self.domain, after,
                                            batch_size)
            if not rows:
                return
            yield [PendingRow(_pending_record(self.kind, row), row["version"]) for row in rows]
            after = rows[-1]["address_key"]

    async def mark_sending(self, rows: Sequence[PendingRow]) -> list[PendingRow]:
        """Write down that these rows are about to be sent; returns the ones unchanged since they
        were read, with their new versions (a row changed meanwhile waits for the next run)."""
        if not rows:
            return []
        async with wrap_db_errors(f"marking {self.ref} sent"), \
                self._db.transaction():
            await self._db.execute(queries()["mark_worker_writes"])
            found = await self._db.fetch(self._q("mark_sending"), self.domain,
                                         [r.record.address for r in rows], [r.version for r in rows])
        versions = {r["address"]: r["version"] for r in found}
        return [PendingRow(r.record, versions[r.record.address]) for r in rows
                if r.record.address in versions]

    async def mark_pushed(self, run_id: uuid.UUID, rows: Sequence[PendingRow]) -> int:
        if not rows:
            return 0
        async with wrap_db_errors(f"marking {self.ref} pushed"), \
                self._db.transaction():
            await self._db.execute(queries()["mark_worker_writes"])
            marked: int = await self._db.fetchval(
                self._q("mark_pushed"), self.domain, run_id,
                [r.record.address for r in rows], [r.version for r in rows])
        return marked

    async def mark_rejected(self, run_id: uuid.UUID, rows: Iterable[tuple[PendingRow, str]]) -> int:
        refused = list(rows)
        if not refused:
            return 0
        async with wrap_db_errors(f"marking {self.ref} rejected"), \
                self._db.transaction():
            await self._db.execute(queries()["mark_worker_writes"])
            marked: int = await self._db.fetchval(
                self._q("mark_rejected"), self.domain, run_id,
                [r.record.address for r, _ in refused], [r.version for r, _ in refused],
                [reason for _, reason in refused])
        return marked


async def _end_list_session(connection: asyncpg.Connection, ref: ListRef) -> None:
    """Drop the session's staging and release the list's lock; or, where that cannot be done
    within milliseconds' work (cancelled mid-operation, a COPY say, or a server gone silent),
    close the connection, which ends the session on the server and so does both. (A connection
    already lost is already back in the pool.)"""
    try:
        if connection.is_closed():
            return
    except asyncpg.InterfaceError:  # terminated, and with that already back in the pool
        return
    try:
        async with asyncio.timeout(SESSION_END_WITHIN):
            await connection.execute(queries()["drop_staging"])
            await connection.fetchval(queries()["unlock_list"], ref.domain, ref.list.value)
        return
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
            TimeoutError):
        pass
    with contextlib.suppress(asyncpg.InterfaceError):
        connection.terminate()


class MirrorStore:
    """The mirror database: migrations, per-list sessions and the run record."""

    def __init__(self, pool: asyncpg.Pool, *, answer_within: float | None = None) -> None:
        """`answer_within`: the pool's DATABASE_TIMEOUT, if it has one (see ListSession)."""
        self._pool = pool
        self._answer_within = answer_within

    @contextlib.asynccontextmanager
    async def list_session(self, ref: ListRef) -> AsyncIterator[ListSession | None]:
        """A session for one list with its lock held, or None when another process holds it."""
        async with wrap_db_errors(f"locking {ref}"):
            connection = await self._pool.acquire()
        try:
            async with wrap_db_errors(f"locking {ref}"):
                locked = await connection.fetchval(queries()["try_lock_list"], ref.domain, ref.list.value)
            if not locked:
                yield None
                return
            try:
                yield ListSession(connection, ref, answer_within=self._answer_within)
            except DatabaseTimeoutError:
                # A statement given up (DATABASE_TIMEOUT): asyncpg's next statement on this
                # connection, and its release, would wait for a cancellation the silent server
                # never answers. (Terminated already: back in the pool.)
                with contextlib.suppress(asyncpg.InterfaceError):
                    connection.terminate()
                raise
            finally:
                await _end_list_session(connection, ref)
        finally:
            await self._pool.release(connection)

    async def count_states(self, ref: ListRef) -> tuple[int, int]:
        """(pending, rejected) rows of one list."""
        async with wrap_db_errors(f"counting {ref}"):
            row = await self._pool.fetchrow(list_query("count_states", ref.list), ref.domain)
        return row["pending"], row["rejected"]

    async def count_states_by_domain(self, kind: SuppressionList) -> dict[str, tuple[int, int]]:
        """(pending, rejected) rows of one list of every domain that has any."""
        async with wrap_db_errors(f"counting the {kind.value} rows of every domain"):
            rows = await self._pool.fetch(list_query("count_states_by_domain", kind))
        return {r["domain"]: (r["pending"], r["rejected"]) for r in rows}

    async def pending_elsewhere(self, domains: Iterable[str]) -> list[dict[str, Any]]:
        """Pending rows of domains other than these, by domain and list: nothing pushes them."""
        async with wrap_db_errors("counting the pending rows of other domains"):
            return [dict(r) for r in await self._pool.fetch(queries()["pending_elsewhere"],
                                                             sorted(set(domains)))]

    async def latest_runs(self) -> list[dict[str, Any]]:
        async with wrap_db_errors("reading the last runs"):
            return [dict(r) for r in await self._pool.fetch(queries()["latest_runs"])]

    async def record_discovery(self, api_base: str, domains: Sequence[str] | None,
                               error: str | None = None) -> None:
        """A region's complete listing (`domains`), or why it failed (`error`: the last complete
        listing stays)."""
        async with wrap_db_errors(f"recording the domains of {api_base}"):
            if domains is not None:
                await self._pool.execute(queries()["discovery_listed"], api_base, list(domains))
            else:
                await self._pool.execute(queries()["discovery_failed"], api_base, error)

    async def discovery_state(self) -> list[dict[str, Any]]:
        """Each region's last complete listing, and the last attempt's error if it failed."""
        async with wrap_db_errors("reading the discovered domains"):
            return [dict(r) for r in await self._pool.fetch(queries()["discovery_state"])]

    async def list_health(self) -> dict[tuple[str, str], tuple[datetime | None, int]]:
        """Per (domain, list) with a recorded run: when it last ended ok, and its runs in a row
        since that did not."""
        async with wrap_db_errors("reading the lists' health"):
            rows = await self._pool.fetch(queries()["list_health"])
        return {(r["domain"], r["list"]): (r["last_ok_at"], r["failures_in_a_row"]) for r in rows}

    async def record_run(self, run_id: uuid.UUID, domain: str, kind: SuppressionList, *, status: RunStatus,
                         dry_run: bool, counts: RunCounts, error: str | None, started: datetime,
                         finished: datetime) -> None:
        async with wrap_db_errors("recording the run"):
            await self._pool.execute(queries()["record_run"], run_id, domain, kind.value, status,
                                     dry_run, *counts.counts(), error, started, finished)
