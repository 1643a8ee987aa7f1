"""Records Mailgun really returns that the mirror cannot hold: skipped, counted and said, never a
reason to block the list or to remove a mirror row."""

from __future__ import annotations

import uuid

import pytest
import structlog

from tests.support.account import DOMAIN
from tests.support.mirror import insert_row, rows
from worker.backfill import Backfiller
from worker.emulator.recorded import RECORDED_UNSUBSCRIBES
from worker.metrics import Metrics
from worker.reconcile import ReconcileOptions
from worker.records import SuppressionList

BOUNCES, UNSUBSCRIBES = SuppressionList.BOUNCES, SuppressionList.UNSUBSCRIBES


async def test_the_recorded_unsubscribe_with_an_empty_address_is_skipped_and_the_list_syncs(
        pool, emulator, make_reconciler):
    # Reference §6.6: Mailgun's own list held {"address": "", "tags": ["*", "Bar", ...]}.
    emulator.seed(DOMAIN, UNSUBSCRIBES, RECORDED_UNSUBSCRIBES)
    with structlog.testing.capture_logs() as logs:
        result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)
    assert (result.status, result.error) == ("ok", None)
    assert (result.status, result.pulled, result.inserted, result.skipped) == ("ok", 3, 3, 1)
    assert set(await rows(pool, UNSUBSCRIBES)) == {
        "bob@example.com", "integration-test-email@DOMAIN.TEST", "lukasbbarry@gmail.com"}
    [warning] = [e for e in logs if e["event"] == "records_skipped"]
    assert warning["log_level"] == "warning" and "empty address" in str(warning["examples"])
    [line] = [e for e in logs if e["event"] == "list_reconciled"]
    assert line["skipped"] == 1
    recorded = await pool.fetchrow("SELECT status, skipped FROM mailgun.sync_runs")
    assert tuple(recorded) == ("ok", 1)
    assert result.as_json()["skipped"] == 1
    metrics = Metrics()
    metrics.observe_run(result, 0.1)
    assert (b'mailgun_sync_records_total{action="skipped",domain="mg.example.com",'
            b'list="unsubscribes"} 1.0') in metrics.exposition()


@pytest.mark.parametrize("fields", [
    {"address": "x" * 10_000 + "@example.com"},
    {"address": "nul\x00byte@example.com"},
    {"error": "nul\x00byte"},
    {"created_at": "the day before yesterday"},
], ids=["10000 characters", "NUL in address", "NUL in error", "unreadable date"])
async def test_a_record_the_mirror_cannot_hold_is_skipped_and_the_others_sync(
        pool, emulator, make_reconciler, fields):
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"ok{i}@example.com"} for i in range(5)])
    emulator.tables.table(DOMAIN, BOUNCES).get("ok2@example.com").update(fields)
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (result.status, result.inserted, result.skipped) == ("ok", 4, 1)
    assert "ok4@example.com" in await rows(pool, BOUNCES)


@pytest.mark.parametrize("created_at", [
    "Sat, 31 Feb 2026 12:00:00 UTC",   # a day the month does not have
    "Sun, 29 Feb 2026 12:00:00 UTC",   # not a leap year
    "Mon, 00 Jan 2026 12:00:00 UTC",
    "Mon, 05 Jan 2026 25:00:00 UTC",
    "Mon, 05 Jan 0000 12:00:00 UTC",
])
async def test_a_date_in_mailguns_usual_form_that_does_not_exist_is_skipped_not_a_failed_list(
        pool, emulator, make_reconciler, created_at):
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"ok{i}@example.com"} for i in range(5)])
    emulator.tables.table(DOMAIN, BOUNCES).get("ok2@example.com")["created_at"] = created_at
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (result.status, result.error) == ("ok", None)
    assert (result.inserted, result.skipped) == (4, 1)


@pytest.mark.parametrize("fields", [
    {"error": "smtp; 550 \x00"},
    {"created_at": "Thu, 99 Foo 2026"},
    {"code": "5\x0050"},
], ids=["NUL in error", "unreadable date", "NUL in code"])
async def test_a_skipped_record_never_removes_the_mirror_row_of_its_address(
        pool, emulator, make_reconciler, fields):
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"b{i}@example.com", "code": "550"} for i in range(5)])
    first = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (first.status, first.inserted) == ("ok", 5)
    before = (await rows(pool, BOUNCES))["B3@example.com".lower()]
    # Mailgun still has b3, but now in a form the mirror cannot take; its case changed too.
    emulator.remove(DOMAIN, BOUNCES, "b3@example.com")
    emulator.seed(DOMAIN, BOUNCES, [{"address": "B3@example.com", "code": "550"}])
    emulator.tables.table(DOMAIN, BOUNCES).get("B3@example.com").update(fields)

    second = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (second.status, second.skipped, second.removed, second.updated) == ("ok", 1, 0, 0)
    assert (await rows(pool, BOUNCES))["b3@example.com"] == before


async def test_a_skipped_record_is_not_taken_as_gone_by_a_ranged_pull_either(pool, emulator, make_reconciler):
    emulator.generate(DOMAIN, BOUNCES, 4000)
    first = await make_reconciler(pull_ranges=4).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (first.status, first.inserted) == ("ok", 4000)
    victims = [r["address"] for r in emulator.records(DOMAIN, BOUNCES)[::400]]
    for address in victims:
        emulator.tables.table(DOMAIN, BOUNCES).get(address)["error"] = "bad\x00"
    second = await make_reconciler(pull_ranges=4).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (second.status, second.skipped, second.removed, second.pulled) == ("ok", 10, 0, 3990)
    assert set(victims) <= set(await rows(pool, BOUNCES))


async def test_a_pending_row_whose_remote_record_is_skipped_is_still_pushed(pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [{"address": "p@example.com", "error": "old\x00"}])
    await insert_row(pool, BOUNCES, DOMAIN, "p@example.com", error="new")
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (result.status, result.skipped, result.pushed) == ("ok", 1, 1)
    assert emulator.records(DOMAIN, BOUNCES)[0]["error"] == "new"


async def test_a_backfill_resumed_across_skipped_records_keeps_their_mirror_rows(
        pool, store, emulator, make_client, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"k{i:02}@example.com"} for i in range(20)])
    assert (await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)).inserted == 20
    table = emulator.tables.table(DOMAIN, BOUNCES)
    table.get("k04@example.com")["error"] = "\x00"       # inside the first page
    table.get("k09@example.com")["error"] = "\x00"       # the last record of the second page
    emulator.seed(DOMAIN, BOUNCES, [{"address": "k09\x00@example.com"}])  # a NUL cursor
    emulator.fail_next(503, times=None, method="GET", page="next", skip=1)  # after 2 pages
    backfill = Backfiller(store, make_client(page_limit=5), ReconcileOptions())
    interrupted = await backfill.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert interrupted.status == "failed"
    emulator.faults.clear()

    result = await backfill.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    # The second page ended on the NUL address, whose cursor PostgreSQL cannot keep: the resume
    # reads it again. Skipped: the placeholders of k04 and k09, and the NUL address.
    assert (result.status, result.removed, result.skipped) == ("ok", 0, 3)
    assert len(await rows(pool, BOUNCES)) == 20
