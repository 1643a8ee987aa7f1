"""Removals and additions under races, crashes and odd answers: an application's deletion stands
and a newer suppression survives, whatever lands between two statements of a run (an application
write, a webhook, a crash) and whatever Mailgun answers."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from tests.support.account import DOMAIN
from tests.support.mirror import insert_row, rows, snapshot
from tests.support.waiting import wait_for
from tests.support.webhooks import deliver, event
from worker.backfill import Backfiller, Progress
from worker.emulator import Fault
from worker.mailgun.retry import RetryPolicy
from worker.reconcile import ReconcileOptions
from worker.records import SuppressionList

BOUNCES, UNSUBSCRIBES = SuppressionList.BOUNCES, SuppressionList.UNSUBSCRIBES
ALLOWLIST = SuppressionList.ALLOWLIST
AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)
CREATED = datetime(2026, 3, 2, 10, tzinfo=UTC)
MAILGUN_DATE = "%a, %d %b %Y %H:%M:%S UTC"


def wire_time(moment: datetime) -> str:
    return moment.strftime("%a, %d %b %Y %H:%M:%S UTC")


async def both_have(pool, emulator, kind, address: str, **data) -> None:
    emulator.seed(DOMAIN, kind, [{"address": address, "created_at": wire_time(CREATED), **data}])
    await insert_row(pool, kind, DOMAIN, address, state="synced", synced_at=AN_HOUR_AGO,
                     created_at=CREATED, **data)


async def run(make_reconciler, kind=BOUNCES, **options):
    return await make_reconciler(**options).reconcile(uuid.uuid4(), DOMAIN, kind)



# ---- 1. deleted, added back, deleted again before a run ------------------------------------------

async def test_a_synced_bounce_deleted_added_back_and_deleted_again_ends_at_neither_side(
        pool, emulator, make_reconciler):
    await both_have(pool, emulator, BOUNCES, "flip@example.com")
    # The application removes it, changes its mind, then removes it again: its last word is "gone".
    await pool.execute("DELETE FROM mailgun.bounces WHERE address_key = 'flip@example.com'")
    await insert_row(pool, BOUNCES, DOMAIN, "flip@example.com")
    await pool.execute("DELETE FROM mailgun.bounces WHERE address_key = 'flip@example.com'")

    first = await run(make_reconciler)
    second = await run(make_reconciler)

    assert (first.status, second.status) == ("ok", "ok")
    assert await rows(pool, BOUNCES) == {}, "the application's deletion was undone in the mirror"
    assert emulator.records(DOMAIN, BOUNCES) == [], "the application's deletion never reached Mailgun"


async def test_an_unsubscribe_deleted_added_back_with_fewer_tags_and_deleted_again_ends_at_neither_side(
        pool, emulator, make_reconciler):
    await both_have(pool, emulator, UNSUBSCRIBES, "reader@example.com", tags=["news", "promo"])
    await pool.execute("DELETE FROM mailgun.unsubscribes")
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, "reader@example.com", tags=["news"])
    await pool.execute("DELETE FROM mailgun.unsubscribes")

    first = await run(make_reconciler, UNSUBSCRIBES)
    second = await run(make_reconciler, UNSUBSCRIBES)

    assert (first.status, second.status) == ("ok", "ok")
    assert await rows(pool, UNSUBSCRIBES) == {}, "the application's deletion was undone in the mirror"
    assert emulator.records(DOMAIN, UNSUBSCRIBES) == [], "Mailgun still unsubscribes the address"


# ---- 2. a resumed backfill whose first page and last page are both empty -------------------------

async def test_a_resumed_backfill_answered_items_null_and_an_empty_last_page_removes_nothing(
        pool, emulator, store, make_client, sleeps):
    addresses = [f"b{i:02}@example.com" for i in range(20)]
    emulator.seed(DOMAIN, BOUNCES, [{"address": a, "created_at": wire_time(CREATED)} for a in addresses])
    await pool.executemany(
        "INSERT INTO mailgun.bounces (domain, address, created_at, sync_state, synced_at)"
        " VALUES ($1, $2, $3, 'synced', $4)", [(DOMAIN, a, CREATED, AN_HOUR_AGO) for a in addresses])
    client = make_client(page_limit=10, retry=RetryPolicy(max_attempts=2, backoff_max=1.0, sleep=sleeps))

    def backfill():
        return Backfiller(store, client, ReconcileOptions(), progress=Progress(io.StringIO()))

    # The backfill commits its first page (10 records), then the next page fails.
    emulator.fail_next(503, times=None, page="next")
    assert (await backfill().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)).status == "failed"
    emulator.faults.clear()
    # Resumed: Mailgun answers the page after the cursor with `items: null`, and the `page=last`
    # read that should confirm the end with `items: null` too: two answers that disagree with the
    # ten records already read past nothing.
    emulator.inject(Fault(action="items_null", page="next"))
    emulator.inject(Fault(action="items_null", page="last"))

    resumed = await backfill().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert resumed.removed == 0, f"{resumed.removed} rows removed on an unconfirmed end ({resumed.status})"
    assert resumed.status == "failed"
    assert sorted(await rows(pool, BOUNCES)) == addresses


# ---- 3. a deletion is later than a transaction's start --------------------------------------------

async def test_a_webhook_older_than_the_applications_delete_does_not_undo_it(
        webhook_http, pool, emulator, make_reconciler):
    await both_have(pool, emulator, BOUNCES, "late@example.com")
    async with pool.acquire() as conn, conn.transaction():
        began = await conn.fetchval("SELECT now()")
        await asyncio.sleep(1.0)  # the application's transaction does other work first
        deleted = await conn.fetchval("SELECT clock_timestamp()")
        await conn.execute("DELETE FROM mailgun.bounces WHERE address_key = 'late@example.com'")
    # Mailgun bounced the address again half a second before the application deleted it; the
    # webhook about that older event is delivered after the deletion.
    bounced = began + (deleted - began) / 2
    emulator.seed(DOMAIN, BOUNCES, [{"address": "late@example.com", "created_at": wire_time(bounced)}])
    answer = await deliver(webhook_http, event("failed", "late@example.com", DOMAIN,
                                       timestamp=bounced.timestamp()))

    result = await run(make_reconciler)

    assert result.status == "ok"
    assert (await rows(pool, BOUNCES) != {}, emulator.records(DOMAIN, BOUNCES) != []) == (False, False), \
        "the application's deletion, newer than Mailgun's bounce, was undone on both sides"
    assert answer == (200, "superseded")


# ---- 4. added back while its DELETE is in flight, a webhook, then the run dies ---------------------

async def session_pid(pool) -> int:
    """The connection of the run holding the list's lock."""
    pid = await pool.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
    assert pid is not None
    return int(pid)


async def test_an_address_added_back_and_bounced_again_while_its_delete_is_in_flight_survives_a_crash(
        webhook_http, pool, emulator, make_reconciler):
    await both_have(pool, emulator, BOUNCES, "again@example.com")
    await pool.execute("DELETE FROM mailgun.bounces WHERE address_key = 'again@example.com'")
    # The run's DELETE is held by Mailgun. Meanwhile the application adds the address back, Mailgun
    # bounces it again and its webhook says so; then Mailgun carries out the DELETE, which takes
    # the new bounce with it, and the run dies before it records the DELETE.
    emulator.inject(Fault(action="delay", delay_s=1.0, method="DELETE"))
    running = asyncio.create_task(run(make_reconciler))
    await wait_for(lambda: any(r.method == "DELETE" for r in emulator.requests))
    await insert_row(pool, BOUNCES, DOMAIN, "again@example.com", code="551", error="re-added")
    now = time.time()
    emulator.seed(DOMAIN, BOUNCES, [{"address": "again@example.com", "code": "550",
                                     "created_at": wire_time(datetime.fromtimestamp(now, UTC))}])
    bounced = event("failed", "again@example.com", DOMAIN, timestamp=now)
    assert await deliver(webhook_http, bounced) == (200, "stored")
    await pool.execute("SELECT pg_terminate_backend($1)", await session_pid(pool))
    crashed = await running
    assert crashed.status == "failed"
    assert emulator.records(DOMAIN, BOUNCES) == []  # the DELETE was carried out

    after = [await run(make_reconciler), await run(make_reconciler)]

    assert [r.status for r in after] == ["ok", "ok"], [r.error for r in after]
    # The newest word on the address is the application's addition and Mailgun's new bounce.
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["again@example.com"], \
        "the application's addition never reached Mailgun"
    assert list(await rows(pool, BOUNCES)) == ["again@example.com"], "the mirror lost the address"


# ---- 5. a suppression added at Mailgun after a carried-out deletion, dated earlier ------------------

async def test_a_bounce_imported_at_mailgun_after_a_deletion_is_not_deleted_by_the_worker(
        pool, emulator, make_reconciler):
    await both_have(pool, emulator, BOUNCES, "import@example.com")
    await pool.execute("DELETE FROM mailgun.bounces WHERE address_key = 'import@example.com'")
    assert (await run(make_reconciler)).deleted == 1
    removed_at = await pool.fetchval("SELECT removed_at FROM mailgun.removals")
    # Later, another tool imports the bounce into Mailgun with the date it happened (Mailgun's API
    # takes `created_at`), a day before the application's deletion: a newer Mailgun event about an
    # older bounce, and nothing the worker itself caused.
    emulator.seed(DOMAIN, BOUNCES, [{"address": "import@example.com", "code": "550",
                                     "created_at": wire_time(removed_at - timedelta(days=1))}])

    first = await run(make_reconciler)
    second = await run(make_reconciler)

    assert (first.status, second.status) == ("ok", "ok")
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["import@example.com"], \
        "the worker deleted at Mailgun a suppression added there after the application's deletion"



async def test_a_dry_run_with_queued_and_requeueable_removals_changes_nothing(
        pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [
        {"address": "Twice@example.com", "created_at": "Mon, 02 Mar 2026 10:00:00 UTC"},
        {"address": "twice@example.com", "created_at": "Tue, 03 Mar 2026 10:00:00 UTC"}])
    await both_have(pool, emulator, BOUNCES, "queued@example.com")
    assert (await run(make_reconciler)).status == "ok"
    await pool.execute("DELETE FROM mailgun.bounces WHERE address_key = 'twice@example.com'")
    emulator.inject(Fault(status=503, times=None, method="GET"))
    # The deletion went out, the pull did not: the other spelling is now requeueable.
    assert (await run(make_reconciler)).deleted == 1
    emulator.faults.clear()
    await pool.execute("DELETE FROM mailgun.bounces WHERE address_key = 'queued@example.com'")
    before = (await snapshot(pool), await pool.fetch("SELECT * FROM mailgun.removals ORDER BY id"),
              emulator.records(DOMAIN, BOUNCES))
    deletes = sum(r.method == "DELETE" for r in emulator.requests)

    dry = await run(make_reconciler, dry_run=True)

    assert dry.deleted == 2  # the queued removal and the requeued other spelling
    assert sum(r.method == "DELETE" for r in emulator.requests) == deletes
    assert (await snapshot(pool), await pool.fetch("SELECT * FROM mailgun.removals ORDER BY id"),
            emulator.records(DOMAIN, BOUNCES)) == before


async def test_a_delete_failing_half_way_through_a_chunk_loses_and_resurrects_nothing(
        pool, emulator, make_reconciler):
    addresses = [f"m{i:03}@example.com" for i in range(40)]
    emulator.seed(DOMAIN, BOUNCES, [{"address": a, "created_at": wire_time(CREATED)} for a in addresses])
    await pool.executemany(
        "INSERT INTO mailgun.bounces (domain, address, created_at, sync_state, synced_at)"
        " VALUES ($1, $2, $3, 'synced', $4)", [(DOMAIN, a, CREATED, AN_HOUR_AGO) for a in addresses])
    await pool.execute("DELETE FROM mailgun.bounces WHERE address < 'm030'")
    emulator.inject(Fault(status=503, times=None, method="DELETE", path_contains="m007"))

    failed = await run(make_reconciler, allow_mass_delete=True)
    assert failed.status == "failed"
    assert 0 < failed.deleted < 30
    emulator.faults.clear()
    done = await run(make_reconciler, allow_mass_delete=True)

    assert done.status == "ok" and failed.deleted + done.deleted == 30
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == addresses[30:]
    assert list(await rows(pool, BOUNCES)) == addresses[30:]
    assert (await run(make_reconciler)).changes() == 0


async def test_a_tag_put_back_and_unsubscribed_again_while_its_removal_is_in_flight_ends_on_both_sides(
        webhook_http, pool, emulator, make_reconciler):
    await both_have(pool, emulator, UNSUBSCRIBES, "reader@example.com", tags=["news", "promo"])
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{news}'")
    emulator.inject(Fault(action="delay", delay_s=0.8, method="DELETE"))
    running = asyncio.create_task(run(make_reconciler, UNSUBSCRIBES))
    await wait_for(lambda: any(r.method == "DELETE" for r in emulator.requests))
    now = time.time()
    assert await deliver(webhook_http, event("unsubscribed", "reader@example.com", DOMAIN, timestamp=now,
                                     tags=["promo"])) == (200, "stored")
    first = await running
    second = await run(make_reconciler, UNSUBSCRIBES)

    assert (first.status, second.status) == ("ok", "ok")
    assert [r["tags"] for r in emulator.records(DOMAIN, UNSUBSCRIBES)] == [["news", "promo"]]
    row = (await rows(pool, UNSUBSCRIBES))["reader@example.com"]
    assert (row["tags"], row["sync_state"]) == (["news", "promo"], "synced")


async def test_an_allowlist_entry_held_in_two_spellings_is_deleted_in_both(pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, ALLOWLIST, [
        {"value": "Partner.example.org", "type": "domain", "created_at": "Mon, 02 Mar 2026 10:00:00 UTC"},
        {"value": "partner.example.org", "type": "domain", "created_at": "Tue, 03 Mar 2026 10:00:00 UTC"}])
    assert (await run(make_reconciler, ALLOWLIST)).inserted == 1
    await pool.execute("DELETE FROM mailgun.allowlist")
    results = [await run(make_reconciler, ALLOWLIST) for _ in range(3)]
    assert [r.status for r in results] == ["ok"] * 3
    assert emulator.records(DOMAIN, ALLOWLIST) == []
    assert await rows(pool, ALLOWLIST) == {}


async def test_a_pending_row_deleted_then_the_push_crashes_after_mailgun_stored_it(
        pool, emulator, make_reconciler):
    await insert_row(pool, BOUNCES, DOMAIN, "sent@example.com")
    emulator.inject(Fault(action="delay_after", delay_s=1.0, method="POST"))
    running = asyncio.create_task(run(make_reconciler))
    await wait_for(lambda: [r for r in emulator.requests if r.method == "POST"])
    await pool.execute("DELETE FROM mailgun.bounces")
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    results = [await run(make_reconciler) for _ in range(2)]
    assert [r.status for r in results] == ["ok", "ok"]
    assert emulator.records(DOMAIN, BOUNCES) == []
    assert await rows(pool, BOUNCES) == {}


async def test_a_webhook_newer_than_a_removal_whose_delete_is_in_flight_survives_a_crash(
        webhook_http, pool, emulator, make_reconciler):
    await both_have(pool, emulator, BOUNCES, "back@example.com")
    await pool.execute("DELETE FROM mailgun.bounces")
    emulator.inject(Fault(action="delay", delay_s=0.8, method="DELETE"))
    running = asyncio.create_task(run(make_reconciler))
    await wait_for(lambda: any(r.method == "DELETE" for r in emulator.requests))
    now = time.time()
    emulator.seed(DOMAIN, BOUNCES, [{"address": "back@example.com",
                                     "created_at": wire_time(datetime.fromtimestamp(now, UTC))}])
    bounced = event("failed", "back@example.com", DOMAIN, timestamp=now)
    assert await deliver(webhook_http, bounced) == (200, "stored")
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await wait_for(lambda: emulator.records(DOMAIN, BOUNCES) == [])  # Mailgun carried the DELETE out
    results = [await run(make_reconciler) for _ in range(2)]
    assert [r.status for r in results] == ["ok", "ok"]
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["back@example.com"]
    assert list(await rows(pool, BOUNCES)) == ["back@example.com"]


async def test_a_tag_dropped_while_a_run_is_under_way_is_not_given_back_by_its_adoption(
        pool, emulator, make_reconciler):
    await both_have(pool, emulator, UNSUBSCRIBES, "ann@example.com", tags=["*"])
    await both_have(pool, emulator, UNSUBSCRIBES, "carol@example.com", tags=["*"])
    await pool.execute("DELETE FROM mailgun.unsubscribes WHERE address = 'carol@example.com'")
    # The run has read its removals and is deleting carol when the application swaps ann's `*`
    # for `news`: ann turns pending, and the removal of `*` is queued for the next run.
    emulator.inject(Fault(action="delay_after", delay_s=0.5, method="DELETE"))
    running = asyncio.create_task(run(make_reconciler, UNSUBSCRIBES))
    await wait_for(lambda: any(r.method == "DELETE" for r in emulator.requests))
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{news}' WHERE address = 'ann@example.com'")
    assert (await running).status == "ok"

    for _ in range(2):
        assert (await run(make_reconciler, UNSUBSCRIBES)).status == "ok"

    remote = {r["address"]: sorted(r["tags"]) for r in emulator.records(DOMAIN, UNSUBSCRIBES)}
    assert remote == {"ann@example.com": ["news"]}
    assert (await rows(pool, UNSUBSCRIBES))["ann@example.com"]["tags"] == ["news"]
    posts = [item["address"] for r in emulator.requests if r.method == "POST" for item in r.json()]
    assert posts == ["ann@example.com"]


async def test_a_late_webhook_older_than_the_applications_change_of_a_pending_row_does_not_undo_it(
        pool, emulator, webhook_http, make_reconciler):
    await both_have(pool, emulator, BOUNCES, "ann@example.com", code="550")
    bounced_at = time.time()
    emulator.remove(DOMAIN, BOUNCES, "ann@example.com")  # then dropped at Mailgun, no webhook
    await asyncio.sleep(0.01)
    await pool.execute("UPDATE mailgun.bounces SET code = '551' WHERE address = 'ann@example.com'")

    # The bounce's webhook, delivered late, is older than the application's change.
    late = event("failed", "ann@example.com", DOMAIN, timestamp=bounced_at, code=550)
    assert await deliver(webhook_http, late) == (200, "superseded")
    assert (await run(make_reconciler)).status == "ok"

    remote = [(r["address"], r["code"]) for r in emulator.records(DOMAIN, BOUNCES)]
    assert remote == [("ann@example.com", "551")]
    assert (await rows(pool, BOUNCES))["ann@example.com"]["sync_state"] == "synced"


async def test_a_tag_removal_kept_by_an_address_added_back_is_not_lost_to_a_run_that_read_it_as_superseded(
        pool, emulator, database_url, make_reconciler):
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "reader@example.com", "tags": ["news", "promo"],
                                         "created_at": CREATED.strftime("%a, %d %b %Y %H:%M:%S UTC")}])
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, "reader@example.com", state="synced",
                     synced_at=AN_HOUR_AGO, created_at=CREATED, tags=["news", "promo"])
    # The application removes the unsubscribe: the whole record's removal and each tag's are queued.
    await pool.execute("DELETE FROM mailgun.unsubscribes")
    assert sorted(await pool.fetchval("SELECT array_agg(tag) FROM mailgun.removals")) == ["", "news", "promo"]

    # A session holding the `promo` removal's row for a moment places the application's write
    # between two of the run's statements: after it read the queue (the tag removals superseded by
    # the whole record's), before it clears them.
    holder = await asyncpg.connect(database_url)
    app = await asyncpg.connect(database_url)
    try:
        hold = holder.transaction()
        await hold.start()
        await holder.execute("SELECT 1 FROM mailgun.removals WHERE tag = 'promo' FOR UPDATE")
        run = asyncio.ensure_future(make_reconciler().reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES))
        for _ in range(500):
            if await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                   " AND datname = current_database()"):
                break
            assert not run.done(), run.result()
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the run never reached the superseded removals")
        # The application changes its mind: the reader stays unsubscribed from `news` only.
        readd = asyncio.ensure_future(app.execute(
            "INSERT INTO mailgun.unsubscribes (domain, address, tags) VALUES ($1, $2, '{news}')",
            DOMAIN, "reader@example.com"))
        await asyncio.sleep(0.3)
        await hold.rollback()
        await readd
        first = await run
    finally:
        await holder.close()
        await app.close()
    second = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)

    assert (first.status, second.status) == ("ok", "ok"), (first.error, second.error)
    remote = {r["address"]: r["tags"] for r in emulator.records(DOMAIN, UNSUBSCRIBES)}
    mirror = {a: (r["tags"], r["sync_state"]) for a, r in (await rows(pool, UNSUBSCRIBES)).items()}
    # README: an unsubscribe added again with fewer tags before the run cancels the whole removal and
    # those of its tags, and the others are still dropped at Mailgun.
    assert (remote, mirror) == ({"reader@example.com": ["news"]},
                                {"reader@example.com": (["news"], "synced")}), (
        f"the dropped tag `promo` is back on both sides: Mailgun {remote}, mirror {mirror}")


async def test_tag_removals_made_moot_by_a_deletion_are_cleared_with_it_even_when_the_run_then_fails(
        pool, emulator, make_reconciler):
    for address, tags in (("reader@example.com", ["news", "promo"]), ("other@example.com", ["x"])):
        emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": address, "tags": tags,
                                             "created_at": CREATED.strftime(MAILGUN_DATE)}])
        await insert_row(pool, UNSUBSCRIBES, DOMAIN, address, state="synced", synced_at=AN_HOUR_AGO,
                         created_at=CREATED, tags=tags)
    # The application removes both unsubscribes: each record's removal and each of its tags' queued.
    await pool.execute("DELETE FROM mailgun.unsubscribes WHERE address = 'reader@example.com'")
    await pool.execute("DELETE FROM mailgun.unsubscribes WHERE address = 'other@example.com'")
    # The second record's DELETE fails (a wrong region's answer): the list fails, the rest stay queued.
    emulator.inject(Fault(status=404, method="DELETE", path_contains="other",
                          message="Domain not found", times=1))

    first = await make_reconciler(allow_mass_delete=True).reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)
    assert first.status == "failed", first
    assert [r["address"] for r in emulator.records(DOMAIN, UNSUBSCRIBES)] == ["other@example.com"]
    # The reader's record is deleted at Mailgun: its tags' removals went with it.
    assert await pool.fetch("SELECT tag FROM mailgun.removals WHERE address = 'reader@example.com'"
                            " AND done_at IS NULL") == []

    # The reader unsubscribes again from `promo`, at Mailgun (a new record, after the deletion).
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "reader@example.com", "tags": ["promo"],
                                         "created_at": datetime.now(UTC).strftime(MAILGUN_DATE)}])

    second = await make_reconciler(allow_mass_delete=True).reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)

    tag_deletes = [r.query["tag"] for r in emulator.requests if r.method == "DELETE" and "reader" in r.path
                   and "tag" in r.query]
    remote = {r["address"]: r["tags"] for r in emulator.records(DOMAIN, UNSUBSCRIBES)}
    mirror = {a: r["tags"] for a, r in (await rows(pool, UNSUBSCRIBES)).items()}
    assert second.status == "ok", second.error
    # The reader's new unsubscribe stays on both sides: no tag removal of the old one was sent.
    assert (tag_deletes, remote, mirror) == (
        [], {"reader@example.com": ["promo"]}, {"reader@example.com": ["promo"]})


async def test_a_tag_removal_sent_once_and_failed_is_cleared_with_its_records_deletion(
        pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "reader@example.com", "tags": ["news", "promo"],
                                         "created_at": CREATED.strftime(MAILGUN_DATE)}])
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, "reader@example.com", state="synced",
                     synced_at=AN_HOUR_AGO, created_at=CREATED, tags=["news", "promo"])
    # The application drops `promo`: a tag removal is queued. Its DELETE fails once (run 1 fails),
    # so it stays queued with sent_at set.
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{news}' WHERE address = 'reader@example.com'")
    emulator.inject(Fault(status=404, method="DELETE", path_contains="reader",
                          message="Domain not found", times=1))
    first = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)
    assert first.status == "failed", first

    # The application then deletes the record whole. Run 2 deletes it whole at Mailgun: the
    # `promo` removal is moot now (its record is gone at Mailgun).
    await pool.execute("DELETE FROM mailgun.unsubscribes WHERE address = 'reader@example.com'")
    second = await make_reconciler(allow_mass_delete=True).reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)
    assert second.status == "ok", second.error
    assert emulator.records(DOMAIN, UNSUBSCRIBES) == []
    assert await pool.fetch("SELECT tag FROM mailgun.removals WHERE done_at IS NULL") == []

    # The reader unsubscribes again from `promo` at Mailgun (a new record, after the deletion).
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "reader@example.com", "tags": ["promo"],
                                         "created_at": datetime.now(UTC).strftime(MAILGUN_DATE)}])
    before = len(emulator.requests)
    third = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)
    tag_deletes = [r.query["tag"] for r in list(emulator.requests)[before:]
                   if r.method == "DELETE" and "tag" in r.query]
    remote = {r["address"]: r["tags"] for r in emulator.records(DOMAIN, UNSUBSCRIBES)}
    mirror = {a: r["tags"] for a, r in (await rows(pool, UNSUBSCRIBES)).items()}
    assert third.status == "ok", third.error
    assert (tag_deletes, remote, mirror) == (
        [], {"reader@example.com": ["promo"]}, {"reader@example.com": ["promo"]})


async def test_a_late_webhook_about_a_record_mailgun_dropped_before_the_delete_found_nothing_stays_gone(
        webhook_http, pool, emulator, make_reconciler):
    # The application deletes a bounce; Mailgun bounces the address again, then drops that record;
    # the run's DELETE is answered "not found"; the webhook about the newer bounce comes late. The
    # DELETE took nothing, so it cannot have taken that record: the newest event, the drop, stands.
    await both_have(pool, emulator, BOUNCES, "late@example.com")
    await pool.execute("DELETE FROM mailgun.bounces")
    await asyncio.sleep(0.05)
    bounced = time.time()
    emulator.remove(DOMAIN, BOUNCES, "late@example.com")
    assert (await run(make_reconciler)).deleted == 1  # "not found"

    answer = await deliver(webhook_http, event("failed", "late@example.com", DOMAIN, timestamp=bounced))
    result = await run(make_reconciler)

    assert answer == (200, "stored")
    assert result.pushed == 0
    assert (await rows(pool, BOUNCES), emulator.records(DOMAIN, BOUNCES)) == ({}, [])


async def test_a_tag_dropped_while_a_run_pulls_is_not_taken_back_by_its_update_nor_sent_back(
        webhook_http, pool, emulator, make_reconciler):
    # A run has read its removal queue, its pull to come; meanwhile the application drops `*` and
    # Mailgun adds `news` (its webhook makes the row synced). The pull's update of the synced row
    # must not take `*` back: the next run would drop it at Mailgun, then send the row back with it.
    for address in ("reader@example.com", "other@example.com"):
        emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": address, "tags": ["*"],
                                             "created_at": CREATED.strftime(MAILGUN_DATE)}])
        await insert_row(pool, UNSUBSCRIBES, DOMAIN, address, state="synced",
                         synced_at=AN_HOUR_AGO, created_at=CREATED, tags=["*"])
    # The run is held in its deletions (of another address), after its queue was read and before
    # its pull starts.
    await pool.execute("DELETE FROM mailgun.unsubscribes WHERE address = 'other@example.com'")
    emulator.inject(Fault(action="hold_after", method="DELETE", times=1))
    running = asyncio.create_task(
        make_reconciler(allow_mass_delete=True).reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES))
    async with asyncio.timeout(10):
        await emulator.until_held()
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{news}' WHERE address = 'reader@example.com'")
    now = time.time()
    added = datetime.fromtimestamp(now, UTC).strftime(MAILGUN_DATE)
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "reader@example.com", "tags": ["*", "news"],
                                         "created_at": added}])
    assert await deliver(webhook_http, event("unsubscribed", "reader@example.com", DOMAIN, timestamp=now,
                                             tags=["news"])) == (200, "stored")
    emulator.release()
    assert (await running).status == "ok"
    posts_before = len([r for r in emulator.requests if r.method == "POST"])

    assert (await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)).status == "ok"

    assert len([r for r in emulator.requests if r.method == "POST"]) == posts_before
    assert {r["address"]: r["tags"] for r in emulator.records(DOMAIN, UNSUBSCRIBES)} == {
        "reader@example.com": ["news"]}
    assert {a: r["tags"] for a, r in (await rows(pool, UNSUBSCRIBES)).items()} == {
        "reader@example.com": ["news"]}

