"""A model-based test of the whole system: the application, Mailgun and the worker act on one
domain's lists in any order, over the real emulator (on a real port) and a real PostgreSQL, and
the promises the README makes hold after every step and after a final fault-free run.

Rules (hypothesis picks them, in any order, for a handful of addresses, one with a case variant):
- the application INSERTs, UPDATEs (bounce code, unsubscribe tags) and DELETEs mirror rows;
- Mailgun suppresses an address (its webhook delivered at once, later, or never) or drops it;
- a reconcile, or a backfill, runs to its end, or is parked on a request Mailgun holds (during
  the pull, at its last page, during a push before or after Mailgun stored the batch, during a
  deletion before or after Mailgun carried it out) while other rules act, and is then let go or
  killed (cancelled, or its PostgreSQL session terminated as in a crash);
- faults for the next run: 404 `Domain not found` on a deletion, `items: null` mid-list followed
  by a last page that agrees or not, 5xx once or for good, connection resets.

Invariants, after each step where they must hold, and after a final fault-free pair of runs:
- I1 every local addition is at Mailgun (every address here is valid, so none is rejected);
- I2 no local deletion is undone on either side, unless a newer Mailgun event re-suppressed it;
- I3 nothing leaves the mirror unless Mailgun did not have it during the run, or the
  application deleted it;
- I4 no record is POSTed again after Mailgun confirmed it (the worker logged it pushed or adopted)
  unless the application changed it or Mailgun dropped it since;
- I5 for each address, the newest event wins on both sides;
- I6 after the final runs the synced rows equal Mailgun's list and nothing is pending or queued.

The model keeps, per (list, address), each event with its real time and who made it; where the
README leaves the outcome open (Mailgun changed a record silently while a local deletion was
queued, say) either outcome is accepted, but both sides must still agree (I6).

Profiles: `MODEL_PROFILE=ci` (the default: derandomized, about a minute) and
`MODEL_PROFILE=long` (3000 random examples of 40 steps, or MODEL_EXAMPLES; 1 to 2 s an example, so
without the suite's per-test time limit):

    MODEL_PROFILE=long .venv/bin/python -m pytest tests/test_model_invariants.py -q --timeout 0
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import structlog
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.support.account import API_KEY, DOMAIN
from tests.support.mirror import empty_mirror, insert_row
from tests.support.webhooks import SIGNING_KEY
from worker.backfill import Backfiller, Progress
from worker.emulator import Fault, MailgunEmulator
from worker.emulator.messages import domain_not_found
from worker.mailgun import MailgunClient
from worker.mailgun.retry import RetryPolicy
from worker.reconcile import ListResult, ReconcileOptions, Reconciler
from worker.records import SuppressionList, format_timestamp
from worker.store import MirrorStore
from worker.webhooks.events import WebhookEvent, address_key, read_event
from worker.webhooks.selftest import event_data, signed
from worker.webhooks.writer import WebhookStore

# A model-based run: a minute or so by default, hours with MODEL_PROFILE=long.
pytestmark = pytest.mark.slow

BOUNCES, UNSUBSCRIBES = SuppressionList.BOUNCES, SuppressionList.UNSUBSCRIBES
LISTS = (BOUNCES, UNSUBSCRIBES)
# Four mailboxes, one of them in two spellings: collisions are frequent.
SPELLINGS = ("ann@example.com", "bob@example.com", "carol@example.com", "Carol@Example.com",
             "dave@example.com")
KEYS = sorted({address_key(a) for a in SPELLINGS})
AN_HOUR = 3600.0
CODES = ("550", "551", "554")
TAG_SETS = (("*",), ("news",), ("promo",), ("news", "promo"))
# Two records a page, so every list of three or more spans pages.
PAGE_LIMIT = 2
MAX_AGE = 86400.0
Mirror = dict[tuple[SuppressionList, str], dict[str, Any]]

PROFILES = {
    "ci": settings(max_examples=40, stateful_step_count=25, derandomize=True, deadline=None,
                   suppress_health_check=list(HealthCheck), print_blob=True),
    "long": settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", "3000")), stateful_step_count=40,
                     deadline=None,
                     suppress_health_check=list(HealthCheck), print_blob=True),
}
PROFILE = os.environ.get("MODEL_PROFILE", "ci")

# Where a run can be parked: the request Mailgun holds, and whether it handles it first.
HOLD_POINTS: dict[str, dict[str, Any]] = {
    "pull": {"action": "hold", "method": "GET", "page": "next"},
    "last page": {"action": "hold_after", "method": "GET", "page": "last"},
    "push, before Mailgun stored it": {"action": "hold", "method": "POST"},
    "push, after Mailgun stored it": {"action": "hold_after", "method": "POST"},
    "delete, before Mailgun did it": {"action": "hold", "method": "DELETE"},
    "delete, after Mailgun did it": {"action": "hold_after", "method": "DELETE"},
}
BACKFILL_POINTS = {"after one page": 0, "after two pages": 1}


async def _no_wait(seconds: float) -> None:
    await asyncio.sleep(0)


@dataclass
class Event:
    """Something that happened to one (list, address): its real time, who did it, what."""

    at: float
    actor: str          # "app" or "mailgun"
    kind: str           # "add" or "delete"
    open: bool = False  # the README allows either outcome (see `expected`)


@dataclass
class Parked:
    """A run (or backfill) waiting on a request Mailgun holds."""

    task: asyncio.Task[ListResult]
    kind: SuppressionList
    point: str
    started_step: int
    backfill: bool


class World:
    """The emulator, the pools and the loop, shared by every example of one test run."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        self.run(self._open())

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    async def _open(self) -> None:
        self.emulator = await self.stack.enter_async_context(
            MailgunEmulator(api_key=API_KEY, domains=[DOMAIN]))
        self.http = await self.stack.enter_async_context(aiohttp.ClientSession())
        self.worker_pool = await asyncpg.create_pool(
            self.database_url, min_size=1, max_size=4, statement_cache_size=0,
            server_settings={"application_name": "mailgun-sync"})
        self.app_pool = await asyncpg.create_pool(
            self.database_url, min_size=1, max_size=2, server_settings={"application_name": "model-app"})
        self.client = MailgunClient(self.http, api_base=str(self.emulator.base_url), api_key=API_KEY,
                                    retry=RetryPolicy(max_attempts=3, backoff_max=1.0, sleep=_no_wait),
                                    page_limit=PAGE_LIMIT, timeout=5.0)
        self.store = MirrorStore(self.worker_pool)
        self.webhooks = WebhookStore(self.worker_pool)

    def close(self) -> None:
        async def shut() -> None:
            self.emulator.release()
            await self.worker_pool.close()
            await self.app_pool.close()
            await self.stack.aclose()

        self.run(shut())
        self.loop.close()

    async def kill_worker_sessions(self) -> None:
        """End, as a crash would, every worker session holding a list's lock."""
        await self.app_pool.execute(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.pid <> pg_backend_pid()")
        for _ in range(500):
            if not await self.app_pool.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("a killed worker's list lock was never released")


def wire_time(at: float) -> str:
    return format_timestamp(datetime.fromtimestamp(at, UTC))


class ModelMachine(RuleBasedStateMachine):
    world: World

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.trace: list[str] = []
        self.broken = False
        self.events: dict[tuple[SuppressionList, str], list[Event]] = defaultdict(list)
        self.parked: Parked | None = None
        self.backfill_started: dict[SuppressionList, int] = {}
        self.late_webhooks: list[tuple[SuppressionList, str, dict[str, Any]]] = []
        # I3: the last step at whose end (or start) Mailgun did not have the key.
        self.absent_seen: dict[tuple[SuppressionList, str], int] = {}
        # I4: keys Mailgun confirmed (pushed, adopted) and nothing changed since.
        self.confirmed: set[tuple[SuppressionList, str]] = set()
        # Why Mailgun has a key: Mailgun's own suppression, or a push of the worker's.
        self.origin: dict[tuple[SuppressionList, str], str] = {}
        self.seen_requests = 0
        self.seen_change = 0
        self.deleted_now: set[tuple[SuppressionList, str]] = set()
        self.completing: Parked | None = None
        self.do(self._reset())
        self.mirror_before = self.do(self._mirror())

    # ---- plumbing ---------------------------------------------------------------------------

    def note(self, caller: Any) -> None:
        arguments = {k: v for k, v in caller.f_locals.items() if k not in ("self", "act", "coroutine")}
        self.trace.append(f"{time.time():.3f} step {self.step + 1}: {caller.f_code.co_name}({arguments})")

    @property
    def emulator(self) -> MailgunEmulator:
        return self.world.emulator

    def do(self, coroutine: Any) -> Any:
        # The rule calling, with its arguments and the time: a failure that depends on timing
        # cannot be replayed, so the steps that led to it are printed with it.
        self.note(sys._getframe(1))
        try:
            return self.world.run(coroutine)
        except BaseException:
            self.broken = True
            print("\n".join(self.trace))
            raise

    async def _reset(self) -> None:
        self.emulator.reset()
        self.emulator.declare(DOMAIN)
        await self.world.kill_worker_sessions()
        await empty_mirror(self.world.app_pool)
        for kind in LISTS:
            self._observe_mailgun(kind)

    def remote(self, kind: SuppressionList) -> dict[str, list[dict[str, Any]]]:
        """Mailgun's list by key (two spellings of one mailbox are two records there)."""
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in self.emulator.records(DOMAIN, kind):
            found[address_key(record["address"])].append(record)
        return found

    async def _mirror(self) -> Mirror:
        out = {}
        for kind in LISTS:
            for row in await self.world.app_pool.fetch(
                    f"SELECT * FROM mailgun.{kind.value} WHERE domain = $1", DOMAIN):
                out[(kind, row["address_key"])] = dict(row)
        return out

    def _observe_mailgun(self, kind: SuppressionList) -> None:
        remote = self.remote(kind)
        for key in KEYS:
            if key not in remote:
                self.absent_seen[(kind, key)] = self.step
                self.confirmed.discard((kind, key))
                self.origin.pop((kind, key), None)
            else:
                self.origin.setdefault((kind, key), "push")

    def new_event(self, kind: SuppressionList, key: str, event: Event) -> None:
        self.events[(kind, key)].append(event)

    async def _row_state(self, kind: SuppressionList, key: str) -> str | None:
        state: str | None = await self.world.app_pool.fetchval(
            f"SELECT sync_state::text FROM mailgun.{kind.value} WHERE domain = $1 AND address_key = $2",
            DOMAIN, key)
        return state

    async def _removal_queued(self, kind: SuppressionList, key: str) -> bool:
        queued: bool = await self.world.app_pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM mailgun.removals WHERE domain = $1 AND list = $2 "
            "AND address_key = $3 AND tag = '' AND done_at IS NULL)", DOMAIN, kind.value, key)
        return queued

    def _in_flight_post(self, kind: SuppressionList, key: str) -> bool:
        return any(r.method == "POST" and f"/{kind.path}" in r.path and key in r.body.decode().lower()
                   for r in self.emulator.held)

    def reconciler(self, *, backfill: bool = False) -> Reconciler:
        options = ReconcileOptions(pull_ranges=1)
        if backfill:
            return Backfiller(self.world.store, self.world.client, options, progress=Progress(every=3600))
        return Reconciler(self.world.store, self.world.client, options)

    @initialize(bounces=st.sets(st.sampled_from(KEYS)), unsubscribes=st.sets(st.sampled_from(KEYS)))
    def both_sides_start_in_step(self, bounces: set[str], unsubscribes: set[str]) -> None:
        """Records Mailgun has had for an hour, mirrored as a run left them."""

        async def act() -> None:
            at = time.time() - AN_HOUR
            for kind, keys in ((BOUNCES, bounces), (UNSUBSCRIBES, unsubscribes)):
                for key in sorted(keys):
                    data: dict[str, Any] = {"code": "550", "error": "550 mailbox unavailable"} \
                        if kind is BOUNCES else {"tags": ["*"]}
                    self.emulator.seed(DOMAIN, kind, [{"address": key, "created_at": wire_time(at), **data}])
                    await insert_row(self.world.app_pool, kind, DOMAIN, key, state="synced",
                                     synced_at=datetime.fromtimestamp(at, UTC),
                                     created_at=datetime.fromtimestamp(int(at), UTC), **data)
                    self.origin[(kind, key)] = "mailgun"
                    self.new_event(kind, key, Event(at, "mailgun", "add"))

        self.do(self._step(act()))

    # ---- the application --------------------------------------------------------------------

    @rule(kind=st.sampled_from(LISTS), address=st.sampled_from(SPELLINGS),
          code=st.sampled_from(CODES), tags=st.sampled_from(TAG_SETS))
    def app_inserts(self, kind: SuppressionList, address: str, code: str, tags: tuple[str, ...]) -> None:
        async def act() -> None:
            data = {"code": code} if kind is BOUNCES else {"tags": list(tags)}
            names = ", ".join(data)
            try:
                await self.world.app_pool.execute(
                    f"INSERT INTO mailgun.{kind.value} (domain, address, {names}) VALUES ($1, $2, $3)",
                    DOMAIN, address, *data.values())
            except asyncpg.UniqueViolationError:
                return  # the application sees the row is there already
            self.new_event(kind, address_key(address), Event(time.time(), "app", "add"))
            self.confirmed.discard((kind, address_key(address)))

        self.do(self._step(act()))

    @rule(kind=st.sampled_from(LISTS), key=st.sampled_from(KEYS), code=st.sampled_from(CODES),
          tags=st.sampled_from(TAG_SETS))
    def app_updates(self, kind: SuppressionList, key: str, code: str, tags: tuple[str, ...]) -> None:
        async def act() -> None:
            column, value = ("code", code) if kind is BOUNCES else ("tags", list(tags))
            state = await self.world.app_pool.fetchval(
                f"UPDATE mailgun.{kind.value} SET {column} = $3 WHERE domain = $1 AND address_key = $2 "
                "RETURNING sync_state::text", DOMAIN, key, value)
            # Only a change of the row's data is a local addition (the row becomes pending).
            if state == "pending":
                self.new_event(kind, key, Event(time.time(), "app", "add"))
                self.confirmed.discard((kind, key))

        self.do(self._step(act()))

    @rule(kind=st.sampled_from(LISTS), key=st.sampled_from(KEYS))
    def app_deletes(self, kind: SuppressionList, key: str) -> None:
        async def act() -> None:
            deleted = await self.world.app_pool.fetchrow(
                f"DELETE FROM mailgun.{kind.value} WHERE domain = $1 AND address_key = $2 "
                "RETURNING sync_state::text AS state, address", DOMAIN, key)
            if deleted is None:
                return
            now = time.time()
            # A pending row of a mailbox Mailgun suppressed on its own (the mirror has not heard
            # yet): the README only promises to cancel the push; what the next pull does is open.
            mailgun_own = deleted["state"] == "pending" and self.origin.get((kind, key)) == "mailgun"
            # Mailgun keeps whole seconds: a record in another spelling from the deletion's second
            # may be newer than it, and the README keeps it.
            same_second = any(r["address"] != deleted["address"] and r["created_at"] == wire_time(now)
                              for r in self.remote(kind).get(key, []))
            self.new_event(kind, key, Event(now, "app", "delete", open=mailgun_own or same_second))
            self.confirmed.discard((kind, key))
            self.deleted_now.add((kind, key))

        self.do(self._step(act()))

    # ---- Mailgun ----------------------------------------------------------------------------

    @rule(kind=st.sampled_from(LISTS), address=st.sampled_from(SPELLINGS), code=st.sampled_from(CODES),
          tags=st.sampled_from(TAG_SETS), webhook=st.sampled_from(["now", "later", "never"]))
    def mailgun_suppresses(self, kind: SuppressionList, address: str, code: str,
                           tags: tuple[str, ...], webhook: str) -> None:
        async def act() -> None:
            key = address_key(address)
            now = time.time()
            record: dict[str, Any] = {"address": address, "created_at": wire_time(now)}
            if kind is BOUNCES:
                record.update(code=code, error=f"{code} mailbox unavailable")
                data = event_data("failed", address, DOMAIN, timestamp=now, code=int(code))
            else:
                record["tags"] = list(tags)
                data = event_data("unsubscribed", address, DOMAIN, timestamp=now,
                                  tags=[t for t in tags if t != "*"])
            self.emulator.seed(DOMAIN, kind, [record])
            self.origin.setdefault((kind, key), "mailgun")
            # Mailgun's record changed (its data, its tags): sending the mirror's again is no repeat.
            self.confirmed.discard((kind, key))
            # Without a webhook at once, the README lets a queued local deletion win (it cannot
            # know better), or the record come back: either, as long as both sides agree.
            queued = webhook != "now" and await self._removal_queued(kind, key)
            self.new_event(kind, key, Event(now, "mailgun", "add", open=queued))
            payload = signed(SIGNING_KEY, data)
            if webhook == "now":
                await self._deliver(payload)
            elif webhook == "later":
                self.late_webhooks.append((kind, key, payload))

        self.do(self._step(act()))

    @precondition(lambda self: self.late_webhooks)
    @rule(which=st.integers(min_value=0, max_value=5))
    def late_webhook_arrives(self, which: int) -> None:
        _, _, payload = self.late_webhooks.pop(which % len(self.late_webhooks))
        self.do(self._step(self._deliver(payload)))

    async def _deliver(self, payload: dict[str, Any]) -> None:
        event = read_event(orjson.dumps(payload), key=SIGNING_KEY, domains=[DOMAIN], max_age=MAX_AGE,
                           now=time.time())
        assert isinstance(event, WebhookEvent)
        await self.world.webhooks.write([event])
        # The row may take the event's tags, or turn pending to be sent back (a DELETE of the address
        # may have taken Mailgun's record): sending it afterwards is no repeated POST.
        self.confirmed.discard((event.kind, address_key(event.address)))

    @rule(kind=st.sampled_from(LISTS), key=st.sampled_from(KEYS))
    def mailgun_drops(self, kind: SuppressionList, key: str) -> None:
        async def act() -> None:
            spellings = [r["address"] for r in self.emulator.records(DOMAIN, kind)
                         if address_key(r["address"]) == key]
            if not spellings:
                return
            for address in spellings:
                self.emulator.remove(DOMAIN, kind, address)
            # A local addition not yet confirmed may still be pushed after this: open.
            unconfirmed = await self._row_state(kind, key) == "pending" or self._in_flight_post(kind, key)
            # A webhook about a suppression from within a minute of a DELETE of the address (in flight
            # or one that found a record) is written pending, for the two clocks (README): it may be
            # sent back.
            near_a_delete = await self.world.app_pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM mailgun.removals WHERE domain = $1 AND list = $2 "
                "AND address_key = $3 AND sent_at IS NOT NULL AND (done_at IS NULL OR "
                "(found IS NOT FALSE AND done_at > clock_timestamp() - interval '1 minute')))",
                DOMAIN, kind.value, key)
            self.new_event(kind, key, Event(time.time(), "mailgun", "delete",
                                            open=unconfirmed or near_a_delete))

        self.do(self._step(act()))

    # ---- faults for the next run ------------------------------------------------------------

    @rule(kind=st.sampled_from(LISTS))
    def next_deletion_finds_no_domain(self, kind: SuppressionList) -> None:
        self.note(sys._getframe())
        self.emulator.inject(Fault(status=404, method="DELETE", list=kind.path,
                                   message=domain_not_found(DOMAIN)))

    @rule(kind=st.sampled_from(LISTS), last=st.sampled_from(["agrees", "null"]))
    def next_pull_gets_items_null_mid_list(self, kind: SuppressionList, last: str) -> None:
        self.note(sys._getframe())
        self.emulator.inject(Fault(action="items_null", method="GET", list=kind.path, page="next"))
        if last == "null":
            self.emulator.inject(Fault(action="items_null", method="GET", list=kind.path, page="last"))

    @rule(method=st.sampled_from(["GET", "POST", "DELETE"]), times=st.sampled_from([1, None]),
          action=st.sampled_from(["status", "reset"]))
    def next_requests_fail(self, method: str, times: int | None, action: str) -> None:
        self.note(sys._getframe())
        self.emulator.inject(Fault(action=action, status=503, method=method, times=times))

    # ---- the worker -------------------------------------------------------------------------

    # Runs and backfills may start while another is parked (one of the same list is skipped): a
    # rule's availability must not depend on timing, or hypothesis could not replay a sequence.
    @rule(kind=st.sampled_from(LISTS))
    def reconcile(self, kind: SuppressionList) -> None:
        self.do(self._step(self._run_to_end(kind, backfill=False)))

    @rule(kind=st.sampled_from(LISTS))
    def backfill(self, kind: SuppressionList) -> None:
        self.do(self._step(self._run_to_end(kind, backfill=True)))

    async def _run_to_end(self, kind: SuppressionList, *, backfill: bool) -> None:
        task = asyncio.ensure_future(self.reconciler(backfill=backfill).reconcile(uuid.uuid4(), DOMAIN, kind))
        self.completing = Parked(task, kind, "", self._started(kind, backfill), backfill)
        await self._finish(task, kind, backfill)

    def _started(self, kind: SuppressionList, backfill: bool) -> int:
        """The step at whose end Mailgun was as this run (or resumed backfill) first saw it."""
        if backfill:
            return self.backfill_started.setdefault(kind, self.step - 1)
        return self.step - 1

    async def _finish(self, task: asyncio.Task[ListResult], kind: SuppressionList, backfill: bool) -> None:
        try:
            await asyncio.wait({task}, timeout=30)
        finally:
            self.emulator.faults.clear()
        assert task.done(), "a run did not end within 30 s"
        if backfill and not await self.world.app_pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM mailgun.backfill_progress WHERE domain = $1 AND list = $2)",
                DOMAIN, kind.value):
            self.backfill_started.pop(kind, None)

    @rule(kind=st.sampled_from(LISTS), point=st.sampled_from(sorted(HOLD_POINTS)))
    def a_run_is_parked(self, kind: SuppressionList, point: str) -> None:
        if self.parked is not None:
            return  # one parked run at a time
        self.do(self._step(self._park(kind, point, Fault(list=kind.path, **HOLD_POINTS[point]), False)))

    @rule(kind=st.sampled_from(LISTS), point=st.sampled_from(sorted(BACKFILL_POINTS)))
    def a_backfill_is_parked(self, kind: SuppressionList, point: str) -> None:
        if self.parked is not None:
            return
        fault = Fault(action="hold", method="GET", list=kind.path, page="next", skip=BACKFILL_POINTS[point])
        self.do(self._step(self._park(kind, point, fault, True)))

    async def _park(self, kind: SuppressionList, point: str, fault: Fault, backfill: bool) -> None:
        self.emulator.inject(fault)
        task = asyncio.ensure_future(self.reconciler(backfill=backfill).reconcile(uuid.uuid4(), DOMAIN, kind))
        # The run gets this far in this step: what it applied before parking is checked now.
        self.completing = Parked(task, kind, point, self._started(kind, backfill), backfill)
        held = asyncio.ensure_future(self.emulator.until_held())
        await asyncio.wait({task, held}, return_when=asyncio.FIRST_COMPLETED, timeout=30)
        if self.emulator.held:
            # The request Mailgun holds was sent ahead (the pager asks for the next page while it
            # stores this one): let the run finish what it was doing before it waits on it.
            await asyncio.sleep(0.05)
            self.parked = self.completing
            return
        held.cancel()
        # It never got there (nothing to push, say): it ran to its end.
        await self._finish(task, kind, backfill)

    @rule(how=st.sampled_from(["released", "cancelled", "crashed"]))
    def the_parked_run_ends(self, how: str) -> None:
        if self.parked is None:
            return
        async def act() -> None:
            parked = self.parked
            assert parked is not None
            self.parked = None
            self.completing = parked
            if how == "crashed":
                await self.world.kill_worker_sessions()
            if how != "released":
                parked.task.cancel()
                await asyncio.wait({parked.task}, timeout=30)
            self.emulator.release()
            await self._finish(parked.task, parked.kind, parked.backfill)
            if how == "released":
                parked.task.result()
            elif not parked.task.cancelled():
                parked.task.exception()  # a killed run may end in any error; it is gone either way

        self.do(self._step(act()))

    # ---- the invariants checked after each step ---------------------------------------------

    async def _step(self, action: Any) -> None:
        self.step += 1
        self.deleted_now = set()
        self.completing = None
        await action
        await self._check_step()

    async def _check_step(self) -> None:
        mirror = await self._mirror()
        for kind in LISTS:
            self._observe_mailgun(kind)
        self._check_no_deletion_undone(mirror)
        self._check_nothing_left_without_cause(mirror)
        await self._check_no_post_repeated()
        self.mirror_before = mirror

    def _check_no_deletion_undone(self, mirror: Mirror) -> None:
        for (kind, key), events in self.events.items():
            newest = max(events, key=lambda e: e.at)
            if newest.actor == "app" and newest.kind == "delete" and not newest.open:
                assert (kind, key) not in mirror, (
                    f"I2: {kind.value} {key} was deleted by the application (and nothing newer "
                    f"happened), but the mirror has it again: {mirror[(kind, key)]}")

    def _check_nothing_left_without_cause(self, mirror: Mirror) -> None:
        for gone in set(self.mirror_before) - set(mirror):
            if gone in self.deleted_now:
                continue
            run = self.completing
            seen_gone = run is not None and run.kind is gone[0] \
                and self.absent_seen.get(gone, -1) >= run.started_step
            assert seen_gone, (
                f"I3: {gone[0].value} {gone[1]} left the mirror, but Mailgun had it throughout "
                f"and the application did not delete it (was {self.mirror_before[gone]})")

    async def _check_no_post_repeated(self) -> None:
        requests = list(self.emulator.requests)
        fresh, self.seen_requests = requests[self.seen_requests:], len(requests)
        for request in fresh:
            if request.method != "POST":
                continue
            kind = next(k for k in LISTS if request.path.endswith(f"/{k.path}"))
            for item in request.json():
                key = address_key(item["address"])
                assert (kind, key) not in self.confirmed, (
                    f"I4: {kind.value} {key} was POSTed again after Mailgun confirmed it, "
                    "with no change on either side since")
        changes = await self.world.app_pool.fetch(
            "SELECT id, list, address_key, action FROM mailgun.changes WHERE id > $1 ORDER BY id",
            self.seen_change)
        for change in changes:
            self.seen_change = change["id"]
            if change["action"] in ("push", "synced"):
                self.confirmed.add((SuppressionList.parse(change["list"]), change["address_key"]))

    # ---- the end: a fault-free pair of runs, then both sides agree --------------------------

    def teardown(self) -> None:
        try:
            if not self.broken:
                self.do(self._final())
        finally:
            self.world.run(self._cleanup())

    async def _cleanup(self) -> None:
        self.emulator.faults.clear()
        self.emulator.release()
        if self.parked is not None:
            self.parked.task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.parked.task, 30)
            self.parked = None
        await asyncio.sleep(0.02)  # the driver's cancellation requests of killed runs finish

    async def _final(self) -> None:
        self.emulator.faults.clear()
        if self.parked is not None:
            parked, self.parked = self.parked, None

            async def let_go() -> None:
                self.completing = parked
                self.emulator.release()
                await self._finish(parked.task, parked.kind, parked.backfill)

            await self._step(let_go())
            self.completing = None
        while self.late_webhooks:
            await self._step(self._deliver(self.late_webhooks.pop(0)[2]))
        for kind in list(self.backfill_started):
            await self._step(self._run_to_end(kind, backfill=True))
        for kind in LISTS:
            # A second run only if the first changed something: it may leave work for the next.
            for _ in range(2):
                await self._step(self._run_to_end(kind, backfill=False))
                assert self.completing is not None
                result = self.completing.task.result()
                assert result.status == "ok", f"a fault-free run failed: {result}"
                if not result.changes():
                    break
        mirror = await self._mirror()
        for kind in LISTS:
            remote = self.remote(kind)
            for key in KEYS:
                self._check_final(kind, key, remote, mirror)
            synced = {k for (m_kind, k), row in mirror.items()
                      if m_kind is kind and row["sync_state"] == "synced"}
            assert synced == set(remote), (
                f"I6: {kind.value}: the synced rows {sorted(synced)} are not Mailgun's list {sorted(remote)}")
            for key, records in remote.items():
                if len(records) > 1:
                    continue  # two spellings at Mailgun, one row here: which data it holds is open
                row, record = mirror[(kind, key)], records[0]
                data = ("code", "error") if kind is BOUNCES else ("tags",)
                assert [row[c] for c in data] == [record[c] for c in data], (
                    f"I6: {kind.value} {key}: the mirror has {row} but Mailgun {record}")
        states = {row["sync_state"] for row in mirror.values()}
        assert states <= {"synced"}, f"I6: rows left {states - {'synced'}} after two fault-free runs"
        assert not await self.world.app_pool.fetchval(
                "SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL"), (
            "I6: local deletions still queued after two fault-free runs")

    def _check_final(self, kind: SuppressionList, key: str, remote: dict[str, Any],
                     mirror: Mirror) -> None:
        events = self.events.get((kind, key))
        if not events:
            return
        newest = max(events, key=lambda e: e.at)
        if newest.open:
            return
        at_mailgun, in_mirror = key in remote, (kind, key) in mirror
        where = f"{kind.value} {key}: newest event {newest.actor} {newest.kind}"
        if newest.actor == "app" and newest.kind == "add":
            assert at_mailgun, f"I1: {where}, but Mailgun does not have it"
        if newest.actor == "app" and newest.kind == "delete":
            assert not (at_mailgun or in_mirror), (
                f"I2: {where}, but it is back (Mailgun: {at_mailgun}, mirror: {in_mirror})")
        want = newest.kind == "add"
        assert (at_mailgun, in_mirror) == (want, want), (
            f"I5: {where}, but Mailgun has it: {at_mailgun}, the mirror has it: {in_mirror}")


@pytest.mark.timeout(0 if PROFILE == "long" else 300)
def test_the_invariants_hold_whatever_the_application_mailgun_and_the_worker_do(database_url: str) -> None:
    # Thousands of runs: their log lines would drown hypothesis's report.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    world = World(database_url)
    try:
        def machine() -> ModelMachine:
            ModelMachine.world = world
            return ModelMachine()

        run_state_machine_as_test(machine, settings=PROFILES[PROFILE])
    finally:
        world.close()
