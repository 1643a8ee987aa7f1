"""Regressions for defects found in review: each once let a run lose or overwrite data, or hang."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.conftest import DOMAIN
from tests.support.mirror import insert_row, rows
from worker import errors
from worker.devtools.sql import queries
from worker.emulator import EmulatorSettings, Fault
from worker.records import SuppressionList

BOUNCES = SuppressionList.BOUNCES
UNSUBSCRIBES = SuppressionList.UNSUBSCRIBES


async def test_an_empty_page_in_a_middle_range_removes_nothing(pool, emulator, make_client, make_reconciler):
    emulator.generate(DOMAIN, BOUNCES, 12_000)
    await pool.execute(queries()["bench_prepare_mirror"], DOMAIN, 12_000, 0)
    emulator.inject(Fault(action="items_null", page="next", skip=9))
    reconciler = make_reconciler(client=make_client(page_limit=500), pull_ranges=4)

    result = await reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (result.status, result.removed) == ("failed", 0)
    assert "the pull is incomplete" in str(result.error)
    again = await reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert again.status == "ok"
    assert len(await rows(pool, BOUNCES)) == 12_000


async def test_an_empty_first_page_does_not_wipe_a_small_list(pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"few{i}@example.com"} for i in range(8)])
    first = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert first.inserted == 8
    emulator.inject(Fault(action="items_null", page=""))
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (result.status, result.removed) == ("failed", 0)
    assert len(await rows(pool, BOUNCES)) == 8


@pytest.mark.parametrize("emulator_settings", [EmulatorSettings(case_sensitive=False)])
async def test_a_pivot_mailgun_does_not_have_cannot_hide_records_between_ranges(emulator, make_client):
    # Case-blind order: "a_@x.com" < "aB..." there, but "aB..." < "a_@x.com" in code points.
    emulator.seed(DOMAIN, BOUNCES, [{"address": a} for a in
                                    ("a1@x.com", "a_@x.com", "ac@x.com", "b@x.com", "c@x.com")])
    client = make_client(page_limit=2)
    with pytest.raises(errors.PagingOrderError):
        _ = [p async for p in client.ranged_pages(DOMAIN, BOUNCES, ["aB@x.com"])]


async def test_a_failing_range_stops_the_pull_even_with_the_queue_full(emulator, make_client):
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"q{i:04}@example.com"} for i in range(400)])
    emulator.fail_next(400, times=None, path_contains="bounces", page="next", skip=30)
    pivots = [f"q{i:04}" for i in range(50, 400, 50)]
    client = make_client(page_limit=5)

    async def slow_consumer() -> None:
        async for _ in client.ranged_pages(DOMAIN, BOUNCES, pivots):
            await asyncio.sleep(0.05)

    with pytest.raises(errors.MailgunRejectedError):
        await asyncio.wait_for(slow_consumer(), timeout=20)


async def test_a_resumed_backfill_does_not_vouch_for_rows_added_after_it_began(
        pool, store, emulator, make_client, make_reconciler):
    from worker.backfill import Backfiller, Progress
    from worker.reconcile import ReconcileOptions

    emulator.seed(DOMAIN, BOUNCES, [{"address": f"b{i:04}@example.com"} for i in range(300)])
    client = make_client(page_limit=100)
    emulator.fail_next(503, times=None, page="next", skip=1)
    backfill = Backfiller(store, client, ReconcileOptions(), progress=Progress(every=3600))
    assert (await backfill.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)).status == "failed"
    emulator.faults.clear()
    # Meanwhile Mailgun drops b0003, and the application adds it as its own suppression.
    emulator.remove(DOMAIN, BOUNCES, "b0003@example.com")
    await insert_row(pool, BOUNCES, DOMAIN, "b0003@example.com")

    resumed = await backfill.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert resumed.status == "ok"
    assert (await rows(pool, BOUNCES))["b0003@example.com"]["sync_state"] == "pending"
    later = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert later.pushed == 1
    assert "b0003@example.com" in {r["address"] for r in emulator.records(DOMAIN, BOUNCES)}


async def test_keys_fold_ascii_letters_only_whatever_the_collation(pool):
    await insert_row(pool, BOUNCES, DOMAIN, "INFO@Example.COM")
    await insert_row(pool, BOUNCES, DOMAIN, "ÄBC@X.COM")
    keys = {r["address"]: r["address_key"] for r in (await rows(pool, BOUNCES)).values()}
    assert keys == {"INFO@Example.COM": "info@example.com", "ÄBC@X.COM": "Äbc@x.com"}


async def test_a_rejected_unsubscribe_mailgun_has_is_synced_not_resent(pool, emulator, make_reconciler):
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, "u@example.com", state="rejected",
                     sync_error="refused", tags=["news", "promo"])
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "u@example.com", "tags": ["news"]}])
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)
    assert (result.adopted, result.pushed) == (1, 0)
    row = (await rows(pool, UNSUBSCRIBES))["u@example.com"]
    assert (row["sync_state"], row["tags"]) == ("synced", ["news"])
