"""`mailgun-sync backfill`: a one-shot full pull for new installs and large accounts, resumable.

Each page is committed with the cursor after it, so a backfill interrupted anywhere (SIGKILL
included) continues from its last committed page; once the list is read to its end, the pages
are diffed into the mirror exactly as a `run` would, and the backfill's pages are cleared.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TextIO

from worker.logs import StatusLine, get_logger
from worker.mailgun import MailgunClient
from worker.reconcile import ListResult, ReconcileOptions, Reconciler
from worker.records import ListRef
from worker.store import ListSession, MirrorStore, QueuedRemoval

log = get_logger(__name__)


class Progress:
    """A log line every `every` seconds per list; a one-line bar on a terminal, which log lines
    never share and whose counts are the last log line's."""

    def __init__(self, out: TextIO | None = None, *, every: float = 5.0) -> None:
        out = out or sys.stdout
        self._bar = StatusLine(out) if out.isatty() else None
        self._every = every
        self._started = time.monotonic()
        self._last_log = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self._last_log = self._started

    def page(self, ref: ListRef, records: int, pages: int, resumed_pages: int) -> None:
        now = time.monotonic()
        elapsed = max(now - self._started, 1e-6)
        rate = (pages - resumed_pages) / elapsed
        # The bar first: a log line now is written above it, and the bar drawn again after it
        # shows the same counts.
        if self._bar is not None:
            # On a narrow terminal the list's name gives way, not the counts.
            self._bar.show(str(ref), tail=f": {records:,} records, {pages:,} pages, "
                                          f"{rate:,.1f} pages/s, {elapsed:,.0f}s")
        if now - self._last_log >= self._every:
            self._last_log = now
            log.info("backfill_progress", **ref.labels, records=records, pages=pages,
                     pages_per_s=round(rate, 1), elapsed_s=round(elapsed, 1))

    def done(self) -> None:
        if self._bar is not None:
            self._bar.end()


class Backfiller(Reconciler):
    """A reconcile whose pull is committed page by page and resumes where it stopped."""

    def __init__(self, store: MirrorStore, mailgun: MailgunClient, options: ReconcileOptions, *,
                 push: bool = False, progress: Progress | None = None) -> None:
        super().__init__(store, mailgun, ReconcileOptions(
            allow_mass_delete=options.allow_mass_delete,
            max_delete_fraction=options.max_delete_fraction, push=push))
        self._progress = progress or Progress(every=5.0)

    async def _pull(self, session: ListSession, result: ListResult, *,
                    removed_first: Sequence[QueuedRemoval] = ()) -> datetime:
        # A backfill is never a dry run: its removals were carried out before it pulls.
        saved = await session.backfill_progress()
        if saved and await session.backfill_overtaken(saved.started_at):
            # A run or a removal at Mailgun since these pages were read: they may list records
            # deleted meanwhile, which applying them would bring back. Start over.
            log.info("backfill_restarted", reason="the list changed since its pages were read",
                     pages=saved.pages)
            await session.clear_backfill()
            saved = None
        after = saved.last_address if saved else None
        records, pages = (saved.records, saved.pages) if saved else (0, 0)
        # Skipped records whose address does not fit the mirror leave no placeholder with the
        # pages: counted as read by this process (a resumed backfill misses earlier ones).
        unheld = 0
        resumed = pages
        if saved:
            log.info("backfill_resumed", after=after, pages=pages, records=records)
        started = saved.started_at if saved else await session.database_now()
        self._progress.start()
        try:
            async for page in self._mailgun.pages(session.domain, session.kind, after=after,
                                                  resumed=after is not None):
                await session.backfill_page(page)
                records += page.held
                unheld += sum(1 for s in page.skipped if not s.held)
                pages += 1
                self._progress.page(session.ref, records, pages, resumed)
        finally:
            self._progress.done()
        staged = await session.stage_backfill()
        result.pulled, result.skipped = staged.records, staged.skipped + unheld
        return started

    async def _applied(self, session: ListSession, *, guarded: bool) -> None:
        # A guarded backfill keeps its pages: run again with --allow-mass-delete and it applies
        # them at once instead of pulling the whole list anew.
        if not guarded:
            await session.clear_backfill()
