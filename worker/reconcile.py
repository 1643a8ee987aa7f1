"""One reconcile of one (domain, list): lock, pull, diff, push, record. The only place that orders
these steps.

Safety rules kept here:
- nothing is applied, removed or pushed unless the pull read the whole list;
- a pending row becomes synced only after Mailgun answered its batch with a 2xx;
- a run that would remove more than the allowed share of a list removes nothing (`guarded`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from worker.errors import DatabaseError, ListShiftedError, MailgunError, PagingOrderError, SyncError
from worker.logs import get_logger
from worker.mailgun import MailgunClient
from worker.records import MAX_BATCH, ListRef, SuppressionList, record_problem
from worker.runs import RunCounts, RunStatus
from worker.store import ListSession, MirrorStore, PendingRow, QueuedRemoval

log = get_logger(__name__)

# A guard that trips on two removed rows out of ten would stop every small list; below this many
# removals the fraction is not checked.
GUARD_MIN_REMOVALS = 10

# Reads of a list whose offsets shifted under the legacy pager, before the run fails.
LIST_SHIFTED_ATTEMPTS = 3

# Removals are written down as sent, then recorded as carried out, this many at a time: a crash
# sends at most this many DELETEs again (each answered "not found" the second time).
REMOVALS_AT_ONCE = 500


@dataclass(slots=True)
class ListResult(RunCounts):
    """A run of one (domain, list): its status, its counts, and why it did not end ok."""

    domain: str
    list: str
    status: RunStatus = RunStatus.OK
    error: str | None = None
    # Seconds spent in each step (pull, diff, apply, push): logged, not part of the report.
    timings: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def succeeded(self) -> bool:
        return self.status.succeeded

    def as_json(self) -> dict[str, object]:
        return {"domain": self.domain, "list": self.list, "status": self.status,
                **self.by_name(), "error": self.error}

    @contextlib.contextmanager
    def timed(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[step] = round(time.perf_counter() - started, 3)


@dataclass(frozen=True, kw_only=True)
class ReconcileOptions:
    dry_run: bool = False
    allow_mass_delete: bool = False
    max_delete_fraction: float = 0.10
    push: bool = True
    pull_ranges: int = 16
    push_batch_size: int = MAX_BATCH
    push_read_ahead: int = 4 * MAX_BATCH
    delete_concurrency: int = 16


def guard_trips(removals: int, synced_rows: int, fraction: float) -> bool:
    return removals > GUARD_MIN_REMOVALS and removals > fraction * synced_rows


class Reconciler:
    def __init__(self, store: MirrorStore, mailgun: MailgunClient, options: ReconcileOptions) -> None:
        self._store = store
        self._mailgun = mailgun
        self._options = options

    async def run(self, run_id: uuid.UUID, domains: Sequence[str],
                  kinds: Sequence[SuppressionList]) -> list[ListResult]:
        return [await self.reconcile(run_id, domain, kind) for domain in domains for kind in kinds]

    async def reconcile(self, run_id: uuid.UUID, domain: str, kind: SuppressionList) -> ListResult:
        """Reconcile one list; every outcome is a result, except a cancellation, which is recorded
        as a failed run and then propagates. Nothing is half-applied either way: the diff is one
        transaction, and a row is marked pushed only from Mailgun's answer to its own batch."""
        ref = ListRef(domain, kind)
        result = ListResult(domain, kind.value)
        # The recorded span is the time the list's lock was held, so runs of one list never overlap.
        span: list[datetime | None] = [datetime.now(UTC), None]
        clock = time.perf_counter()
        with structlog.contextvars.bound_contextvars(run_id=str(run_id), **ref.labels):
            try:
                async with self._store.list_session(ref) as session:
                    if session is None:
                        result.status = RunStatus.SKIPPED
                    else:
                        span[0] = datetime.now(UTC)
                        try:
                            await self._reconcile(session, run_id, result)
                        finally:
                            span[1] = datetime.now(UTC)
            except SyncError as exc:
                result.status, result.error = RunStatus.FAILED, str(exc)
            except asyncio.CancelledError:
                result.status = RunStatus.FAILED
                result.error = "interrupted before the end; unconfirmed rows stay pending"
                await self._finish(run_id, kind, result, span, clock, cancelled=True)
                raise
            await self._finish(run_id, kind, result, span, clock)
        return result

    async def _finish(self, run_id: uuid.UUID, kind: SuppressionList, result: ListResult,
                      span: list[datetime | None], clock: float, *, cancelled: bool = False) -> None:
        # A skipped run did nothing; recording it would bury the real runs under replicas' skips.
        if not self._options.dry_run and result.status is not RunStatus.SKIPPED:
            started, finished = span
            await self._record(run_id, kind, result, started or datetime.now(UTC),
                               finished or datetime.now(UTC))
        # A failed list wants looking at; a guarded one, or one cancelled by a stop, will be run
        # again.
        again = cancelled or result.status == RunStatus.GUARDED
        level = log.info if result.succeeded else log.warning if again else log.error
        level("list_reconciled", status=result.status, **result.by_name(), error=result.error,
              dry_run=self._options.dry_run, seconds=round(time.perf_counter() - clock, 3),
              steps=result.timings)

    async def _pull(self, session: ListSession, result: ListResult, *,
                    removed_first: Sequence[QueuedRemoval] = ()) -> datetime:
        """Stage the whole remote list (without what `removed_first` would take away at Mailgun);
        returns when the pull started (by the database's clock).

        A large list is read in parallel keyset ranges cut where the mirror's own addresses say
        the list is evenly split, which hides Mailgun's round trips; if Mailgun's order turns out
        not to be the one ranges rely on, the list is read again with one pager.
        """
        pull_started = await session.database_now()
        domain, kind = session.domain, session.kind
        pivots = await session.pivots(self._options.pull_ranges)
        if pivots:
            try:
                staged = await session.stage(
                    self._mailgun.ranged_pages(domain, kind, pivots), ranged=True,
                    removed_first=removed_first)
                result.pulled, result.skipped = staged.records, staged.skipped
                return pull_started
            except PagingOrderError as exc:
                log.warning("ranges_abandoned", reason=str(exc))
        for attempt in range(1, LIST_SHIFTED_ATTEMPTS + 1):
            try:
                staged = await session.stage(self._mailgun.pages(domain, kind),
                                             removed_first=removed_first)
                break
            except ListShiftedError as exc:
                if attempt == LIST_SHIFTED_ATTEMPTS:
                    raise
                log.warning("pull_restarted", reason=str(exc), attempt=attempt)
        result.pulled, result.skipped = staged.records, staged.skipped
        return pull_started

    async def _reconcile(self, session: ListSession, run_id: uuid.UUID, result: ListResult) -> None:
        options = self._options
        sent = await self._deleted(session, run_id, result, "delete", "nothing else done")
        if sent is None:
            return
        try:
            with result.timed("pull"):
                # The run's pull follows its deletions at Mailgun, which the dry run does not
                # send: it takes them out of what it pulls instead, so that its counts are the run's.
                pull_started = await self._pull(session, result,
                                                removed_first=sent if options.dry_run else ())
        except MailgunError as exc:
            result.status, result.error = RunStatus.FAILED, f"pull incomplete, nothing changed: {exc}"
            return
        if options.dry_run:  # the run deletes the other spellings its pull finds, in turn
            result.deleted += await session.other_spellings(sent)
        with result.timed("diff"):
            plan = await session.plan(pull_started)
        guarded = not options.allow_mass_delete and guard_trips(
            plan.removals, plan.synced_rows, options.max_delete_fraction)
        if guarded and result.status is not RunStatus.GUARDED:
            result.status = RunStatus.GUARDED
            result.error = (
                f"would remove {plan.removals} of {plan.synced_rows} synced rows, more than "
                f"SYNC_MAX_DELETE_FRACTION={options.max_delete_fraction}; removed nothing "
                "(--allow-mass-delete lets it through)")
        if options.dry_run:
            result.inserted, result.updated, result.adopted = plan.inserts, plan.updates, plan.adoptions
            result.removed = 0 if guarded else plan.removals
            # The run validates each row before sending it: so does the dry run, so that its
            # counts are the run's (Mailgun's own refusals aside).
            invalid = 0
            async for rows in session.planned_pushes(options.push_read_ahead):
                invalid += sum(1 for row in rows if record_problem(session.kind, row.record) is not None)
            result.pushed, result.rejected = plan.pushes - invalid, invalid
            result.deleted += plan.requeues
            return
        with result.timed("apply"):
            applied = await session.apply(run_id, pull_started, remove=not guarded,
                                          requeue=plan.requeues > 0)
        result.inserted, result.updated = applied.inserted, applied.updated
        result.removed, result.adopted = applied.removed, applied.adopted
        await self._applied(session, guarded=guarded)
        # Another spelling of an address deleted earlier: deleted now, so that this run leaves
        # both sides in step rather than the next.
        if plan.requeues and await self._deleted(session, run_id, result, "delete again",
                                                 "nothing pushed") is None:
            return
        if not options.push:
            return
        try:
            with result.timed("push"):
                await self._push(session, run_id, result, pull_started)
        except MailgunError as exc:
            result.status = RunStatus.FAILED
            result.error = f"push stopped, unconfirmed rows stay pending: {exc}"

    async def _deleted(self, session: ListSession, run_id: uuid.UUID, result: ListResult, step: str,
                       skipped: str) -> list[QueuedRemoval] | None:
        """Send the queued removals: those sent (a dry run's: those a run would send), or None,
        the list failed, if Mailgun stopped them."""
        try:
            with result.timed(step):
                return await self._send_removals(session, run_id, result)
        except MailgunError as exc:
            result.status = RunStatus.FAILED
            result.error = f"deletions stopped, the rest stay queued; {skipped}: {exc}"
            return None

    async def _send_removals(self, session: ListSession, run_id: uuid.UUID,
                             result: ListResult) -> list[QueuedRemoval]:
        """Delete at Mailgun what the application removed locally, before the pull, so the pull
        sees Mailgun without them. The deletion guard covers whole records; dropped unsubscribe
        tags are always sent, or the pull's adoption would give them back to the mirror."""
        queued = await session.queued_removals()
        if not queued:
            return []
        options = self._options
        whole = [r for r in queued if r.tag is None]
        gone = {r.key for r in whole}
        # A tag of a record deleted whole goes with it: nothing to send. Its removal is cleared
        # when the record's DELETE is carried out (removals_done), not before: the address may be
        # added back meanwhile, cancelling that DELETE but not this.
        tags = [r for r in queued if r.tag is not None and r.key not in gone]
        synced = await session.count_synced()
        if not options.allow_mass_delete and guard_trips(len(whole), synced + len(whole),
                                                         options.max_delete_fraction):
            result.status = RunStatus.GUARDED
            result.error = (
                f"would delete {len(whole)} of {synced + len(whole)} records at Mailgun, more than "
                f"SYNC_MAX_DELETE_FRACTION={options.max_delete_fraction}; deleted nothing "
                "(--allow-mass-delete lets it through)")
            whole = []
        todo = sorted(whole + tags, key=lambda r: r.id)
        if options.dry_run:
            result.deleted = len(todo)
            return todo
        sent: list[QueuedRemoval] = []
        for start in range(0, len(todo), REMOVALS_AT_ONCE):
            chunk = await session.removals_sending(todo[start:start + REMOVALS_AT_ONCE])
            done, not_found, failure = await self._delete_all(session, chunk)
            await session.removals_done(run_id, done, not_found)
            result.deleted += len(done)
            sent += done
            if failure is not None:
                removal, exc = failure
                await session.removal_failed(removal.id, str(exc))
                raise exc
        return sent

    async def _delete_all(self, session: ListSession, removals: Sequence[QueuedRemoval]
                          ) -> tuple[list[QueuedRemoval], set[int],
                                     tuple[QueuedRemoval, MailgunError] | None]:
        """DELETE each at Mailgun, a bounded number at a time (the client's request budget paces
        them); after the first failure no more are started. What was carried out, the ids of
        those Mailgun answered "not found", and the failure."""
        done: list[QueuedRemoval] = []
        not_found: set[int] = set()
        failures: list[tuple[QueuedRemoval, MailgunError]] = []
        slots = asyncio.Semaphore(self._options.delete_concurrency)

        async def delete(removal: QueuedRemoval) -> None:
            async with slots:
                if failures:
                    return
                try:
                    found = await self._mailgun.delete(session.domain, session.kind, removal.address,
                                                       tag=removal.tag)
                except MailgunError as exc:
                    failures.append((removal, exc))
                    return
                done.append(removal)
                if not found:
                    not_found.add(removal.id)

        await asyncio.gather(*(delete(removal) for removal in removals))
        return done, not_found, (failures[0] if failures else None)

    async def _applied(self, session: ListSession, *, guarded: bool) -> None:
        """Called once a complete pull has been applied to the mirror."""

    async def _push(self, session: ListSession, run_id: uuid.UUID, result: ListResult,
                    pull_started: datetime) -> None:
        """Push pending rows the pull has judged; each is marked only from its own batch's answer."""
        async for rows in session.pending(self._options.push_read_ahead, pull_started):
            invalid = [(row, problem) for row in rows
                       if (problem := record_problem(session.kind, row.record)) is not None]
            result.rejected += await session.mark_rejected(run_id, invalid)
            refused = {id(row) for row, _ in invalid}
            valid = await session.mark_sending([row for row in rows if id(row) not in refused])
            by_address = {row.record.address: row for row in valid}
            outcomes = self._mailgun.push(session.domain, session.kind, [row.record for row in valid],
                                          batch_size=self._options.push_batch_size)
            # Closed at once if marking fails, so no batch is left running in the background.
            async with contextlib.aclosing(outcomes):
                async for outcome in outcomes:
                    confirmed: list[PendingRow] = [by_address[r.address] for r in outcome.accepted]
                    result.pushed += await session.mark_pushed(run_id, confirmed)
                    result.rejected += await session.mark_rejected(
                        run_id, [(by_address[r.record.address], r.reason) for r in outcome.rejected])

    async def _record(self, run_id: uuid.UUID, kind: SuppressionList, result: ListResult,
                      started: datetime, finished: datetime) -> None:
        try:
            await self._store.record_run(
                run_id, result.domain, kind, status=result.status, dry_run=False, counts=result,
                error=result.error, started=started, finished=finished)
        except DatabaseError as exc:
            log.error("run_not_recorded", error=str(exc))
