"""Webhook events into the mirror, with group commit.

Each request hands its event to one `WebhookWriter` and waits; the writer takes whatever has
queued up meanwhile (up to `max_batch`) and writes it in one transaction, then answers every
request of the batch. A burst therefore costs a few transactions, not one each, and a request is
answered only once its row is committed. If a batch fails, its events are written again one by
one, so one bad event cannot fail the others.

Every signed delivery uses its token up in the transaction that decides its outcome: an event's
token with its row (or its being superseded), an ignored or refused delivery's token on its own
(`TokenOnly`). Of deliveries sharing a token, the first in arrival order counts and the others are
replays, within a batch as across batches and replicas (the token's primary key). A batch that
fails commits nothing, its tokens included, so Mailgun's retry of the delivery (same token) is
taken as new. Written again one by one, a token is still decided by its first delivery: a later
one is a replay once the first is committed, and fails with it if it fails, never written before
or instead of it.

An event the database refuses for its own data (DataRefusedError: an application's constraint on
the mirror, a value it cannot hold) can never be stored, however often Mailgun retries it: its
token is used up on its own and it is answered 406 (WebhookDataRefusedError), so a copy carrying
other event-data is a replay. Any other failure (a lost connection, a timeout, a serialization
failure) leaves the token unused, for Mailgun's retry.

Each statement decides on its snapshot. A change of an event's address another transaction
commits while the write waits for it (an application's INSERT the write's insert then conflicts
with, an UPDATE or DELETE of the row) leaves the event `moved`, neither applied nor superseded: the
batch's statements are undone to a savepoint and run again, when they see the change and apply
the event by the rules for what they find. Moved again, the batch fails (503).

A batch's transaction is over within WRITE_WITHIN seconds or abandoned, its connection terminated,
and its requests answered 503: a connection a failover lost would otherwise never answer, and every
webhook after it would wait behind it. If it was abandoned during its COMMIT, it may have been
committed; Mailgun's retry is then a replay, answered 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from worker.database import connection_within
from worker.errors import (
    DatabaseError,
    DatabaseTimeoutError,
    DataRefusedError,
    SyncError,
    WebhookDataRefusedError,
)
from worker.logs import get_logger
from worker.records import SuppressionList
from worker.sql import queries
from worker.store import list_query
from worker.webhooks.events import TokenOnly, WebhookEvent

log = get_logger(__name__)

# USED: a TokenOnly delivery's token recorded, not seen before. MOVED, never an answer: an event
# another transaction changed its address under while it was written (see webhook_write).
STORED, REPLAY, SUPERSEDED, USED, MOVED = "stored", "replay", "superseded", "used", "moved"
# How many times a batch's statements are run when another transaction moved an address of it
# each time, before its requests are answered 503: the second run sees what the first waited for.
WRITE_TRIES = 2

Delivery = WebhookEvent | TokenOnly

# How long a batch's transaction may take before it is abandoned. A batch of 500 takes
# a few tens of milliseconds; a request waits at most for the batch under way and its own, 8 s,
# so it is answered before Mailgun gives up on it (about 10 s) and Mailgun's retry finds nothing
# committed instead of a write still waiting.
WRITE_WITHIN = 4.0
# Pruning tokens deletes those of up to `prune_every` seconds of webhooks at once: more time, on a
# connection of its own beside the writer's, but bounded all the same.
PRUNE_WITHIN = 30.0


def _row(event: WebhookEvent) -> dict[str, Any]:
    return {"token": event.token, "signed_at": event.signed_at.isoformat(), "domain": event.domain,
            "address": event.address, "code": event.code, "error": event.error,
            "created_at": event.created_at.isoformat(), "occurred_at": event.occurred_at.isoformat(),
            "tags": list(event.tags),
            "event_id": event.event_id, "change_id": str(uuid.uuid4())}


def rounds(events: Sequence[WebhookEvent]) -> tuple[list[dict[SuppressionList, list[WebhookEvent]]],
                                                     set[int]]:
    """Split a batch into rounds of at most one event per (list, domain, address), in arrival
    order, so a later event for an address is applied after an earlier one. Also the positions of
    events whose token came earlier in the batch: replays."""
    out: list[dict[SuppressionList, list[WebhookEvent]]] = []
    keys: list[set[tuple[SuppressionList, str, str]]] = []
    tokens: set[str] = set()
    repeated: set[int] = set()
    for position, event in enumerate(events):
        if event.token in tokens:
            repeated.add(position)
            continue
        tokens.add(event.token)
        number = next((n for n, taken in enumerate(keys) if event.key not in taken), len(keys))
        if number == len(keys):
            keys.append(set())
            out.append({})
        keys[number].add(event.key)
        out[number].setdefault(event.kind, []).append(event)
    return out, repeated


class WebhookStore:
    def __init__(self, pool: asyncpg.Pool, *, within: float = WRITE_WITHIN,
                 prune_within: float = PRUNE_WITHIN) -> None:
        self._pool = pool
        self._within = within
        self._prune_within = prune_within

    async def write(self, deliveries: Sequence[Delivery]) -> list[str]:
        """Write deliveries in one transaction; each one's outcome, in order: an event's stored,
        superseded or replay, a TokenOnly's used or replay."""
        seen: set[str] = set()
        repeated: set[int] = set()
        for position, delivery in enumerate(deliveries):
            if delivery.token in seen:
                repeated.add(position)
            seen.add(delivery.token)
        firsts = [d for i, d in enumerate(deliveries) if i not in repeated]
        batches, _ = rounds([d for d in firsts if isinstance(d, WebhookEvent)])
        only = [d for d in firsts if isinstance(d, TokenOnly)]
        outcome: dict[str, str] = {}
        async with connection_within(self._pool, self._within, "storing webhook events") as connection, \
                connection.transaction():
            for _ in range(WRITE_TRIES):
                # A savepoint: a write another transaction moved an address under is undone, and
                # done again on what the new statements' snapshots show (see webhook_write).
                attempt = connection.transaction()
                await attempt.start()
                outcome = await self._write(connection, only, batches)
                if MOVED not in outcome.values():
                    await attempt.commit()
                    break
                await attempt.rollback()
        if MOVED in outcome.values():
            raise DatabaseError(f"PostgreSQL: other transactions changed an address of the webhook events "
                                f"while they were written, {WRITE_TRIES} times over; nothing was committed")
        return [REPLAY if i in repeated else outcome[d.token] for i, d in enumerate(deliveries)]

    @staticmethod
    async def _write(connection: asyncpg.Connection, only: Sequence[TokenOnly],
                     batches: list[dict[SuppressionList, list[WebhookEvent]]]) -> dict[str, str]:
        outcome: dict[str, str] = {}
        if only:
            fresh = {row["token"] for row in await connection.fetch(
                queries()["webhook_use_tokens"], [d.token for d in only], [d.signed_at for d in only])}
            outcome.update((d.token, USED if d.token in fresh else REPLAY) for d in only)
        if batches:
            await connection.execute(queries()["mark_worker_writes"])
        for batch in batches:
            for kind, members in batch.items():
                payload = orjson.dumps([_row(e) for e in members]).decode()
                for row in await connection.fetch(list_query("webhook_write", kind), payload):
                    outcome[row["token"]] = row["outcome"]
        return outcome

    async def prune_tokens(self, older_than: datetime) -> int:
        within = connection_within(self._pool, self._prune_within, "pruning webhook tokens")
        async with within as connection, connection.transaction():
            await connection.execute(queries()["webhook_statement_allowance"],
                                     str(int(self._prune_within * 1000)))
            status = await connection.execute(queries()["webhook_prune_tokens"], older_than)
        return int(status.split()[-1])


_Item = tuple[Delivery, "asyncio.Future[str]"]


class WebhookWriter:
    """One task writing queued events in batches (see the module's docstring)."""

    def __init__(self, store: WebhookStore, *, max_age: float, max_batch: int = 500,
                 prune_every: float = 300.0) -> None:
        self._store = store
        self._max_age = max_age
        self._max_batch = max_batch
        self._prune_every = prune_every
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._pruned = 0.0
        self._behind = 0
        # Pruning goes on beside the batches: a slow or lost prune never holds a webhook up.
        self._pruning: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="webhook-writer")

    async def stop(self, within: float | None = None) -> None:
        """Write what is queued, then stop; after `within` seconds, abandon (below) instead."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        if within is not None:
            await asyncio.wait({self._task}, timeout=within)
            self.abandon()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def abandon(self) -> None:
        """Stop now: the write under way is given up (its connection terminated) and every
        delivery not committed fails, as in a failed batch."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def __aenter__(self) -> WebhookWriter:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def submit(self, delivery: Delivery) -> str:
        """The delivery's outcome once committed; raises WebhookDataRefusedError if the database
        refused the event's own data and its token was used up in its place, else SyncError
        (DatabaseError) if nothing was committed, and then its token is not used up."""
        if self._task is None or self._task.done():
            raise SyncError("the webhook writer is not running")
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((delivery, done))
        return await done

    @property
    def queued(self) -> int:
        """Deliveries waiting for the next batch."""
        return self._queue.qsize()

    async def _run(self) -> None:
        stopping = False
        batch: list[_Item] = []
        try:
            while not (stopping and self._queue.empty()):
                # Whatever queued up while the last batch was being written, up to max_batch.
                batch = []
                item = await self._queue.get()
                while True:
                    if item is None:
                        stopping = True
                    else:
                        batch.append(item)
                    if len(batch) >= self._max_batch or self._queue.empty():
                        break
                    item = self._queue.get_nowait()
                # Deliveries already waiting behind this batch (it is full): if it is given up,
                # they have waited as long as it, and are answered with it.
                self._behind = self._queue.qsize()
                if batch:
                    try:
                        await self._flush(batch)
                    except Exception:  # the writer's guard: one broken batch must not stop it
                        log.exception("webhook_batch_crashed", events=len(batch))
                        for _, done in batch:
                            _settle(done, error=SyncError("storing the webhook event failed unexpectedly"))
                if not stopping:
                    self._maybe_prune()
        finally:
            # Abandoned: what was not committed is answered, not left waiting.
            while not self._queue.empty():
                if (item := self._queue.get_nowait()) is not None:
                    batch.append(item)
            error = SyncError("the webhook writer stopped before storing the event")
            for _, done in batch:
                _settle(done, error=error)
            if self._pruning is not None:
                self._pruning.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pruning

    async def _flush(self, batch: list[_Item]) -> None:
        try:
            outcomes = await self._store.write([delivery for delivery, _ in batch])
        except DatabaseTimeoutError as exc:
            # The database, not an event: written one by one, each would wait as long again. So
            # would the deliveries that were already waiting when it began, batch after batch:
            # they are answered now, and Mailgun retries them. Those that came during it get
            # a batch of their own, on another connection.
            waiting = self._take_waiting(self._behind)
            log.warning("webhook_batch_abandoned", events=len(batch), waiting=len(waiting), error=str(exc))
            for _, done in batch + waiting:
                _settle(done, error=exc)
            return
        except SyncError as exc:
            if len(batch) == 1:
                await self._failed_alone(batch[0], exc)
                return
            log.warning("webhook_batch_failed", events=len(batch), error=str(exc))
            await self._one_by_one(batch)
            return
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            _settle(done, outcome=outcome)

    async def _one_by_one(self, batch: list[_Item]) -> None:
        """A failed batch written again delivery by delivery, in arrival order. Only a token's
        first delivery is written: the others are replays once it is committed (stored, superseded,
        used, or refused with its token used up), and fail with it if nothing was."""
        firsts: dict[str, asyncio.Future[str]] = {}
        for delivery, done in batch:
            first = firsts.get(delivery.token)
            if first is None:
                # A future of the writer's own: the request's may be gone, and the later
                # deliveries of the token still need the first's outcome.
                first = firsts[delivery.token] = asyncio.get_running_loop().create_future()
                await self._flush([(delivery, first)])
                _settle_as(done, first)
            elif (error := first.exception()) is not None and not isinstance(error, WebhookDataRefusedError):
                _settle(done, error=error)
            else:
                _settle(done, outcome=REPLAY)

    async def _failed_alone(self, item: _Item, exc: SyncError) -> None:
        """A delivery whose write failed on its own: 503 with its token unused, unless the database
        refused the event's own data, which no retry can store: then its token is used up on its
        own and it is refused (406)."""
        delivery, done = item
        if not (isinstance(exc, DataRefusedError) and isinstance(delivery, WebhookEvent)):
            _settle(done, error=exc)
            return
        try:
            [outcome] = await self._store.write([TokenOnly(delivery.token, delivery.signed_at)])
        except SyncError as failed:
            _settle(done, error=failed)  # nothing committed, the token included: 503
            return
        if outcome != USED:  # another delivery of the token was committed meanwhile
            _settle(done, outcome=outcome)
            return
        why = f"constraint {exc.constraint}" if exc.constraint else f"SQLSTATE {exc.sqlstate}"
        _settle(done, error=WebhookDataRefusedError(
            f"the database refuses the event's data for mailgun.{delivery.kind.value} ({why})",
            sqlstate=exc.sqlstate, constraint=exc.constraint))

    def _take_waiting(self, count: int) -> list[_Item]:
        items: list[_Item] = []
        stop = False
        for _ in range(min(count, self._queue.qsize())):
            if (item := self._queue.get_nowait()) is None:
                stop = True
            else:
                items.append(item)
        if stop:
            self._queue.put_nowait(None)
        return items

    def _maybe_prune(self) -> None:
        if time.monotonic() - self._pruned < self._prune_every or \
                (self._pruning is not None and not self._pruning.done()):
            return
        self._pruned = time.monotonic()
        self._pruning = asyncio.get_running_loop().create_task(self._prune(), name="webhook-token-prune")

    async def _prune(self) -> None:
        cutoff = datetime.now(UTC) - timedelta(seconds=self._max_age + 60)
        try:
            pruned = await self._store.prune_tokens(cutoff)
        except SyncError as exc:
            log.warning("webhook_token_prune_failed", error=str(exc))
            return
        if pruned:
            log.info("webhook_tokens_pruned", tokens=pruned)


def _settle_as(done: asyncio.Future[str], settled: asyncio.Future[str]) -> None:
    """Settle `done` as `settled` was."""
    if (error := settled.exception()) is not None:
        _settle(done, error=error)
    else:
        _settle(done, outcome=settled.result())


def _settle(done: asyncio.Future[str], *, outcome: str | None = None,
            error: BaseException | None = None) -> None:
    if done.done():  # the request went away
        return
    if error is not None:
        done.set_exception(error)
    else:
        assert outcome is not None
        done.set_result(outcome)
