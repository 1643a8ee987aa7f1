"""Local removals: an application DELETEs a suppression from the mirror, and the next run deletes
it at Mailgun, under the same guard as removals the other way."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests.support.account import DOMAIN
from tests.support.mirror import changes, insert_row, rows, snapshot
from tests.support.waiting import wait_for
from worker.emulator import Fault
from worker.records import SuppressionList

BOUNCES = SuppressionList.BOUNCES
AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)


async def both_have(pool, emulator, addresses) -> None:
    emulator.seed(DOMAIN, BOUNCES, [{"address": a, "created_at": "Mon, 02 Mar 2026 10:00:00 UTC"}
                                    for a in addresses])
    for address in addresses:
        await insert_row(pool, BOUNCES, DOMAIN, address, state="synced", synced_at=AN_HOUR_AGO,
                         created_at=datetime(2026, 3, 2, 10, tzinfo=UTC))


def deletes(emulator) -> list[str]:
    return [r.path.rsplit("/", 1)[-1] for r in emulator.requests if r.method == "DELETE"]


async def run(make_reconciler, **options):
    return await make_reconciler(**options).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)


async def test_a_synced_row_deleted_locally_is_deleted_at_mailgun(pool, emulator, make_reconciler):
    await both_have(pool, emulator, ["keep@example.com", "drop+tag@example.com"])
    await pool.execute("DELETE FROM mailgun.bounces WHERE address = 'drop+tag@example.com'")

    result = await run(make_reconciler)

    assert (result.status, result.deleted, result.inserted) == ("ok", 1, 0)
    assert deletes(emulator) == ["drop%2Btag%40example.com"]
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["keep@example.com"]
    assert list(await rows(pool, BOUNCES)) == ["keep@example.com"]
    assert ("bounces", "drop+tag@example.com", "delete") in await changes(pool)
    assert await pool.fetchval("SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL") == 0


@pytest.mark.parametrize("kind", ["bounces", "unsubscribes", "complaints", "allowlist"])
@pytest.mark.parametrize("change", ["address", "domain"])
async def test_changing_the_address_or_domain_of_a_row_mailgun_holds_is_refused_saying_how(
        pool, kind, change):
    # The old record would stay at Mailgun, no removal queued, and come back with the next pull.
    column = ("value" if kind == "allowlist" else "address") if change == "address" else "domain"
    value = "new@example.com" if change == "address" else "mg.other.example.com"
    await insert_row(pool, kind, DOMAIN, "old@example.com", state="synced", synced_at=AN_HOUR_AGO)
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await pool.execute(f"UPDATE mailgun.{kind} SET {column} = $1", value)
    assert refused.value.message == (f"mailgun.{kind}: the domain and address of a row Mailgun may "
                                     "hold cannot be changed")
    assert refused.value.hint == ("DELETE the row and INSERT the new one: the old record is then "
                                  "deleted at Mailgun")
    assert [(r["domain"], a) for a, r in (await rows(pool, kind)).items()] == [(DOMAIN, "old@example.com")]


@pytest.mark.parametrize("kind", ["bounces", "unsubscribes", "complaints", "allowlist"])
async def test_the_case_of_an_address_mailgun_holds_may_change(pool, kind):
    column = "value" if kind == "allowlist" else "address"
    await insert_row(pool, kind, DOMAIN, "old@example.com", state="synced", synced_at=AN_HOUR_AGO)
    await pool.execute(f"UPDATE mailgun.{kind} SET {column} = 'Old@Example.com'")
    assert list(await rows(pool, kind)) == ["Old@Example.com"]


async def test_the_address_of_a_row_mailgun_refused_may_be_corrected(pool, emulator, make_reconciler):
    # Sent and refused (a 400 for the record), it is not at Mailgun: correcting it sends the new one.
    emulator.inject(Fault(status=400, method="POST", message="'address' parameter is not a valid address"))
    await insert_row(pool, BOUNCES, DOMAIN, "typo@example.com")
    assert (await run(make_reconciler)).rejected == 1
    assert (await rows(pool, BOUNCES))["typo@example.com"]["sync_state"] == "rejected"

    await pool.execute("UPDATE mailgun.bounces SET address = 'fixed@example.com'")

    assert (await run(make_reconciler)).pushed == 1
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["fixed@example.com"]


async def test_a_corrected_address_mailgun_stored_before_refusing_a_retry_is_deleted_there(
        pool, emulator, make_reconciler, make_client):
    # The push's first try is stored, its answer too late; the retry is refused: the row is
    # rejected, yet Mailgun holds it. Its correction queues the old record's removal.
    await insert_row(pool, BOUNCES, DOMAIN, "typo@example.com", code="550", error="no such user")
    emulator.inject(Fault(action="delay_after", delay_s=1.5, times=1, method="POST"))
    emulator.inject(Fault(status=400, message="Invalid request", times=1, method="POST"))
    await make_reconciler(make_client(timeout=0.5)).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (await rows(pool, BOUNCES))["typo@example.com"]["sync_state"] == "rejected"
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["typo@example.com"]

    await pool.execute("UPDATE mailgun.bounces SET address = 'fixed@example.com'")
    result = await run(make_reconciler)

    assert (result.status, result.deleted, result.pushed) == ("ok", 1, 1)
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["fixed@example.com"]
    assert list(await rows(pool, BOUNCES)) == ["fixed@example.com"]


async def test_an_address_changed_by_delete_and_insert_is_deleted_at_mailgun_and_the_new_one_pushed(
        pool, emulator, make_reconciler):
    await both_have(pool, emulator, ["old@example.com"])
    async with pool.acquire() as app, app.transaction():
        await app.execute("DELETE FROM mailgun.bounces WHERE address = 'old@example.com'")
        await app.execute("INSERT INTO mailgun.bounces (domain, address) VALUES ($1, 'new@example.com')",
                          DOMAIN)

    result = await run(make_reconciler)

    assert (result.status, result.deleted, result.pushed) == ("ok", 1, 1)
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["new@example.com"]
    assert list(await rows(pool, BOUNCES)) == ["new@example.com"]


async def test_deleting_a_pending_row_just_cancels_its_push(pool, emulator, make_reconciler):
    await insert_row(pool, BOUNCES, DOMAIN, "never-sent@example.com")
    await pool.execute("DELETE FROM mailgun.bounces")
    result = await run(make_reconciler)
    assert (result.deleted, result.pushed) == (0, 0)
    assert emulator.requests and not [r for r in emulator.requests if r.method != "GET"]


async def test_a_removal_mailgun_no_longer_has_is_done(pool, emulator, make_reconciler):
    await both_have(pool, emulator, ["gone@example.com"])
    await pool.execute("DELETE FROM mailgun.bounces")
    emulator.remove(DOMAIN, BOUNCES, "gone@example.com")
    result = await run(make_reconciler)
    assert (result.status, result.deleted) == ("ok", 1)
    assert await pool.fetchval("SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL") == 0


async def test_a_removal_mailgun_refuses_stays_queued_with_the_reason(pool, emulator, make_reconciler):
    await both_have(pool, emulator, ["stuck@example.com"])
    await pool.execute("DELETE FROM mailgun.bounces")
    emulator.fail_next(503, times=None, method="DELETE")

    failed = await run(make_reconciler)

    assert failed.status == "failed"
    assert "deletions stopped" in str(failed.error)
    assert "HTTP 503" in await pool.fetchval("SELECT last_error FROM mailgun.removals")
    assert await rows(pool, BOUNCES) == {}  # not brought back by a pull while the removal is queued
    emulator.faults.clear()
    done = await run(make_reconciler)
    assert (done.status, done.deleted) == ("ok", 1)
    assert emulator.records(DOMAIN, BOUNCES) == []


async def test_mass_local_deletion_is_guarded(pool, emulator, make_reconciler):
    addresses = [f"m{i:03}@example.com" for i in range(100)]
    await both_have(pool, emulator, addresses)
    await pool.execute("DELETE FROM mailgun.bounces WHERE address < 'm020'")

    guarded = await run(make_reconciler)

    assert (guarded.status, guarded.deleted, guarded.inserted) == ("guarded", 0, 0)
    assert "would delete 20 of 100 records at Mailgun" in str(guarded.error)
    assert deletes(emulator) == []
    allowed = await run(make_reconciler, allow_mass_delete=True)
    assert (allowed.status, allowed.deleted) == ("ok", 20)
    assert len(emulator.records(DOMAIN, BOUNCES)) == 80


async def test_removed_then_added_again_before_the_run_is_kept(pool, emulator, make_reconciler):
    await both_have(pool, emulator, ["back@example.com"])
    await pool.execute("DELETE FROM mailgun.bounces")
    await insert_row(pool, BOUNCES, DOMAIN, "Back@Example.com")
    result = await run(make_reconciler)
    assert (result.deleted, result.adopted) == (0, 1)
    assert deletes(emulator) == []
    assert (await rows(pool, BOUNCES))["back@example.com"]["sync_state"] == "synced"


async def test_removed_locally_and_changed_at_mailgun_meanwhile_the_removal_wins(
        pool, emulator, make_reconciler):
    await both_have(pool, emulator, ["both@example.com"])
    await pool.execute("DELETE FROM mailgun.bounces")
    emulator.seed(DOMAIN, BOUNCES, [{"address": "both@example.com", "code": "554"}])
    result = await run(make_reconciler)
    assert (result.status, result.deleted) == ("ok", 1)
    assert emulator.records(DOMAIN, BOUNCES) == []
    assert await rows(pool, BOUNCES) == {}


async def test_a_dry_run_counts_local_removals_and_sends_none(pool, emulator, make_reconciler):
    await both_have(pool, emulator, ["dry@example.com"])
    await pool.execute("DELETE FROM mailgun.bounces")
    result = await run(make_reconciler, dry_run=True)
    assert result.deleted == 1
    assert deletes(emulator) == []
    assert await pool.fetchval("SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL") == 1


UNSUBSCRIBES = SuppressionList.UNSUBSCRIBES


async def unsubscribed(pool, emulator, address: str, tags: list[str]) -> None:
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": address, "tags": tags,
                                          "created_at": "Mon, 02 Mar 2026 10:00:00 UTC"}])
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, address, state="synced", synced_at=AN_HOUR_AGO,
                     tags=tags, created_at=datetime(2026, 3, 2, 10, tzinfo=UTC))


async def run_unsubscribes(make_reconciler):
    return await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)


async def test_a_tag_dropped_locally_is_dropped_at_mailgun_and_the_rest_kept(
        pool, emulator, make_reconciler):
    await unsubscribed(pool, emulator, "reader@example.com", ["news", "promo"])
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{news}'")

    result = await run_unsubscribes(make_reconciler)

    assert (result.status, result.deleted, result.pushed) == ("ok", 1, 0)
    [delete] = [r for r in emulator.requests if r.method == "DELETE"]
    assert delete.path == f"/v3/{DOMAIN}/unsubscribes/reader%40example.com"
    assert delete.query == {"tag": "promo"}
    assert [r["tags"] for r in emulator.records(DOMAIN, UNSUBSCRIBES)] == [["news"]]
    row = (await rows(pool, UNSUBSCRIBES))["reader@example.com"]
    assert (row["tags"], row["sync_state"]) == (["news"], "synced")
    assert await pool.fetchval("SELECT detail FROM mailgun.changes WHERE action = 'delete'") == "tag promo"
    assert await pool.fetchval("SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL") == 0


async def test_a_tag_dropped_and_put_back_before_the_run_is_not_dropped(pool, emulator, make_reconciler):
    await unsubscribed(pool, emulator, "reader@example.com", ["news", "promo"])
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{news}'")
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{news,promo}'")

    result = await run_unsubscribes(make_reconciler)

    assert (result.status, result.deleted) == ("ok", 0)
    assert [r["tags"] for r in emulator.records(DOMAIN, UNSUBSCRIBES)] == [["news", "promo"]]
    assert (await rows(pool, UNSUBSCRIBES))["reader@example.com"]["sync_state"] == "synced"


async def test_dropping_a_tag_and_adding_another_sends_both(pool, emulator, make_reconciler):
    await unsubscribed(pool, emulator, "reader@example.com", ["news", "promo"])
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{news,weekly}'")

    result = await run_unsubscribes(make_reconciler)

    assert (result.status, result.deleted, result.pushed) == ("ok", 1, 1)
    assert [r["tags"] for r in emulator.records(DOMAIN, UNSUBSCRIBES)] == [["news", "weekly"]]
    row = (await rows(pool, UNSUBSCRIBES))["reader@example.com"]
    assert (row["tags"], row["sync_state"]) == (["news", "weekly"], "synced")
    assert (await run_unsubscribes(make_reconciler)).counts() == (1, 0, 0, 0, 0, 0, 0, 0, 0)


async def test_deleting_the_row_after_dropping_a_tag_deletes_the_record(pool, emulator, make_reconciler):
    await unsubscribed(pool, emulator, "reader@example.com", ["news", "promo"])
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{news}'")
    await pool.execute("DELETE FROM mailgun.unsubscribes")

    result = await run_unsubscribes(make_reconciler)

    assert result.status == "ok"
    assert emulator.records(DOMAIN, UNSUBSCRIBES) == []
    assert await rows(pool, UNSUBSCRIBES) == {}
    assert await pool.fetchval("SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL") == 0


async def test_a_synced_row_changed_locally_then_deleted_is_still_deleted_at_mailgun(
        pool, emulator, make_reconciler):
    await both_have(pool, emulator, ["edited@example.com"])
    await pool.execute("UPDATE mailgun.bounces SET error = 'edited by the application'")
    await pool.execute("DELETE FROM mailgun.bounces")

    result = await run(make_reconciler)

    assert (result.status, result.deleted, result.inserted) == ("ok", 1, 0)
    assert emulator.records(DOMAIN, BOUNCES) == []


async def test_many_dropped_tags_are_not_mass_deletions_and_are_never_undone(pool, emulator, make_reconciler):
    addresses = [f"reader{i:02d}@example.com" for i in range(20)]
    for address in addresses:
        await unsubscribed(pool, emulator, address, ["a", "b"])
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{a}' WHERE address < 'reader15'")

    result = await run_unsubscribes(make_reconciler)

    assert (result.status, result.deleted) == ("ok", 15)
    mirror = await rows(pool, UNSUBSCRIBES)
    assert sorted(tuple(r["tags"]) for r in mirror.values()) == [("a",)] * 15 + [("a", "b")] * 5
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}


async def test_an_unsubscribe_deleted_and_added_again_with_fewer_tags_loses_the_others_at_mailgun(
        pool, emulator, make_reconciler):
    await unsubscribed(pool, emulator, "reader@example.com", ["news", "promo"])
    await pool.execute("DELETE FROM mailgun.unsubscribes")
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, "reader@example.com", tags=["news"])

    result = await run_unsubscribes(make_reconciler)

    assert (result.status, result.deleted) == ("ok", 1)
    assert [r.query for r in emulator.requests if r.method == "DELETE"] == [{"tag": "promo"}]
    assert [r["tags"] for r in emulator.records(DOMAIN, UNSUBSCRIBES)] == [["news"]]
    row = (await rows(pool, UNSUBSCRIBES))["reader@example.com"]
    assert (row["tags"], row["sync_state"]) == (["news"], "synced")


async def test_a_deleted_unsubscribe_is_deleted_whole_in_one_request(pool, emulator, make_reconciler):
    await unsubscribed(pool, emulator, "reader@example.com", ["news", "promo"])
    await pool.execute("DELETE FROM mailgun.unsubscribes")

    result = await run_unsubscribes(make_reconciler)

    assert (result.status, result.deleted) == ("ok", 1)
    assert [r.query for r in emulator.requests if r.method == "DELETE"] == [{}]
    assert await pool.fetchval("SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL") == 0


# ---- a DELETE answered 404 for another reason, a row deleted while its push is in flight -----------

async def test_a_delete_answered_domain_not_found_keeps_the_removal_queued(pool, emulator, make_reconciler):
    await both_have(pool, emulator, ["keep@example.com", "drop@example.com"])
    await pool.execute("DELETE FROM mailgun.bounces WHERE address = 'drop@example.com'")
    # The wrong region, or a domain Mailgun does not know: not "this address is not on the list".
    emulator.fail_next(404, method="DELETE", message=f"Domain not found: {DOMAIN}")

    failed = await run(make_reconciler)

    assert (failed.status, failed.deleted) == ("failed", 0)
    assert f"Domain not found: {DOMAIN}" in str(failed.error)
    assert await pool.fetchval("SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL") == 1

    again = await run(make_reconciler)

    assert (again.status, again.deleted, again.inserted) == ("ok", 1, 0)
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["keep@example.com"]
    assert list(await rows(pool, BOUNCES)) == ["keep@example.com"]


async def test_a_404_with_another_text_is_checked_with_a_get_before_the_removal_is_done(
        pool, emulator, make_reconciler):
    await both_have(pool, emulator, ["keep@example.com", "gone@example.com", "still@example.com"])
    dropped = "'gone@example.com', 'still@example.com'"
    emulator.remove(DOMAIN, BOUNCES, "gone@example.com")  # already gone at Mailgun
    await pool.execute(f"DELETE FROM mailgun.bounces WHERE address IN ({dropped})")
    emulator.fail_next(404, times=2, method="DELETE", message="Not Found")

    result = await run(make_reconciler)

    # Mailgun's GET says "not found in bounces table" for one: done. It still lists the other.
    assert (result.status, result.deleted) == ("failed", 1)
    assert "404" in str(result.error)
    queued = await pool.fetchval("SELECT address FROM mailgun.removals WHERE done_at IS NULL")
    assert queued == "still@example.com"
    assert await run(make_reconciler) is not None
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["keep@example.com"]


async def test_a_pending_row_deleted_while_its_batch_is_in_flight_ends_at_neither_side(
        pool, emulator, make_reconciler):
    await insert_row(pool, BOUNCES, DOMAIN, "sent@example.com")
    # Mailgun stores the batch, then holds its answer while the application deletes the row.
    emulator.inject(Fault(action="delay_after", delay_s=0.5, method="POST"))
    running = asyncio.create_task(run(make_reconciler))
    await wait_for(lambda: [r for r in emulator.requests if r.method == "POST"])
    await pool.execute("DELETE FROM mailgun.bounces WHERE address = 'sent@example.com'")
    first = await running
    assert first.status == "ok", first.error

    second = await run(make_reconciler)

    assert (second.status, second.deleted, second.inserted) == ("ok", 1, 0)
    assert emulator.records(DOMAIN, BOUNCES) == []
    assert await rows(pool, BOUNCES) == {}


async def test_an_address_mailgun_holds_in_two_spellings_is_deleted_in_both(pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [
        {"address": "Twice@example.com", "created_at": "Mon, 02 Mar 2026 10:00:00 UTC"},
        {"address": "twice@example.com", "created_at": "Tue, 03 Mar 2026 10:00:00 UTC"}])
    assert (await run(make_reconciler)).inserted == 1  # one mailbox: the latest record wins
    await pool.execute("DELETE FROM mailgun.bounces WHERE address_key = 'twice@example.com'")

    first = await run(make_reconciler)

    # The spelling deleted was one of two; the other, older than the removal, is not brought back
    # but deleted in the same run, after the pull found it.
    assert (first.status, first.deleted, first.inserted) == ("ok", 2, 0)
    assert await rows(pool, BOUNCES) == {}
    assert emulator.records(DOMAIN, BOUNCES) == []
    assert (await run(make_reconciler)).changes() == 0


async def test_a_spelling_found_after_a_failed_pull_is_deleted_by_the_run_that_finds_it(
        pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [
        {"address": "Twice@example.com", "created_at": "Mon, 02 Mar 2026 10:00:00 UTC"},
        {"address": "twice@example.com", "created_at": "Tue, 03 Mar 2026 10:00:00 UTC"}])
    await run(make_reconciler)
    await pool.execute("DELETE FROM mailgun.bounces WHERE address_key = 'twice@example.com'")
    emulator.fail_next(503, method="GET", times=None)
    failed = await run(make_reconciler)
    assert (failed.status, failed.deleted) == ("failed", 1)  # the removal went; the pull did not
    emulator.faults.clear()

    found = await run(make_reconciler)

    # This run deleted nothing queued before it, yet it leaves nothing for the next.
    assert (found.status, found.deleted, found.inserted) == ("ok", 1, 0), found.error
    assert emulator.records(DOMAIN, BOUNCES) == []
    assert await pool.fetchval("SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL") == 0


async def test_an_address_mailgun_holds_in_three_spellings_is_deleted_in_all_by_the_next_run(
        pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [
        {"address": "THRICE@example.com", "created_at": "Sun, 01 Mar 2026 10:00:00 UTC"},
        {"address": "Thrice@example.com", "created_at": "Mon, 02 Mar 2026 10:00:00 UTC"},
        {"address": "thrice@example.com", "created_at": "Tue, 03 Mar 2026 10:00:00 UTC"}])
    assert (await run(make_reconciler)).inserted == 1
    await pool.execute("DELETE FROM mailgun.bounces WHERE address_key = 'thrice@example.com'")

    first, second = await run(make_reconciler), await run(make_reconciler)

    # Each run deletes the spelling deleted and then one more it finds: never brought back.
    assert (first.deleted, first.inserted, second.deleted, second.inserted) == (2, 0, 1, 0)
    assert await rows(pool, BOUNCES) == {}
    assert emulator.records(DOMAIN, BOUNCES) == []


async def test_a_tag_removal_answered_404_with_another_text_is_done_when_the_tag_is_gone(
        pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, "unsubscribes", [{"address": "u@example.com", "tags": ["news"],
                                            "created_at": "Mon, 02 Mar 2026 10:00:00 UTC"}])
    await insert_row(pool, "unsubscribes", DOMAIN, "u@example.com", state="synced", synced_at=AN_HOUR_AGO,
                     tags=["news", "promo"], created_at=datetime(2026, 3, 2, 10, tzinfo=UTC))
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{news}'")  # drops `promo`
    emulator.fail_next(404, method="DELETE", message="Not Found")

    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, SuppressionList.UNSUBSCRIBES)

    # Mailgun lists the address, but without the tag: the removal is done.
    assert (result.status, result.deleted) == ("ok", 1), result.error
    assert await pool.fetchval("SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL") == 0


UNSUBSCRIBES = SuppressionList.UNSUBSCRIBES
ALLOWLIST = SuppressionList.ALLOWLIST
MARCH = "Mon, 02 Mar 2026 10:00:00 UTC"


async def synced_both_sides(pool, emulator, kind, records) -> None:
    """`records` (address, Mailgun's record) at Mailgun, and the mirror's synced rows of them."""
    emulator.seed(DOMAIN, kind, [{kind.address_field: a, "created_at": MARCH, **extra}
                                 for a, extra in records])
    for address, extra in records:
        await insert_row(pool, kind, DOMAIN, address, state="synced", synced_at=AN_HOUR_AGO,
                         created_at=datetime(2026, 3, 2, 10, tzinfo=UTC), **extra)


async def a_record_deleted_whole(pool, emulator):
    await synced_both_sides(pool, emulator, BOUNCES, [("keep@example.com", {}), ("drop@example.com", {})])
    await pool.execute("DELETE FROM mailgun.bounces WHERE address = 'drop@example.com'")
    return BOUNCES


async def a_tag_dropped(pool, emulator):
    await synced_both_sides(pool, emulator, UNSUBSCRIBES, [("u@example.com", {"tags": ["news", "promo"]}),
                                                          ("v@example.com", {"tags": ["news"]})])
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{promo}' WHERE address = 'u@example.com'")
    return UNSUBSCRIBES


async def every_tag_dropped(pool, emulator):
    await synced_both_sides(pool, emulator, UNSUBSCRIBES, [("u@example.com", {"tags": ["news", "promo"]})])
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{}' WHERE address = 'u@example.com'")
    return UNSUBSCRIBES


async def deleted_with_its_tags_dropped_before(pool, emulator):
    await synced_both_sides(pool, emulator, UNSUBSCRIBES, [("u@example.com", {"tags": ["news", "promo"]})])
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{promo}' WHERE address = 'u@example.com'")
    await pool.execute("DELETE FROM mailgun.unsubscribes WHERE address = 'u@example.com'")
    return UNSUBSCRIBES


async def an_allowlist_entry_deleted(pool, emulator):
    await synced_both_sides(pool, emulator, ALLOWLIST, [("vip@example.com", {"type": "address"}),
                                                       ("partner.example.org", {"type": "domain"})])
    await pool.execute("DELETE FROM mailgun.allowlist WHERE value = 'partner.example.org'")
    return ALLOWLIST


async def another_spelling_at_mailgun(pool, emulator):
    emulator.seed(DOMAIN, BOUNCES, [{"address": "Twice@example.com", "created_at": MARCH}])
    await synced_both_sides(pool, emulator, BOUNCES, [("twice@example.com", {})])
    await pool.execute("DELETE FROM mailgun.bounces WHERE address = 'twice@example.com'")
    return BOUNCES


async def a_mass_deletion(pool, emulator):
    await synced_both_sides(pool, emulator, BOUNCES, [(f"m{i:03}@example.com", {}) for i in range(100)])
    await pool.execute("DELETE FROM mailgun.bounces WHERE address < 'm020'")
    return BOUNCES


@pytest.mark.parametrize("removal", [
    a_record_deleted_whole, a_tag_dropped, every_tag_dropped, deleted_with_its_tags_dropped_before,
    an_allowlist_entry_deleted, another_spelling_at_mailgun, a_mass_deletion])
async def test_a_dry_run_after_local_removals_counts_as_the_run_that_follows_and_changes_nothing(
        pool, emulator, make_reconciler, removal):
    # The run deletes at Mailgun before it pulls: the dry run counts the pull as it would read.
    kind = await removal(pool, emulator)
    before = (await snapshot(pool), await pool.fetch("SELECT * FROM mailgun.removals ORDER BY id"),
              emulator.records(DOMAIN, kind))

    dry = await make_reconciler(dry_run=True).reconcile(uuid.uuid4(), DOMAIN, kind)

    assert (await snapshot(pool), await pool.fetch("SELECT * FROM mailgun.removals ORDER BY id"),
            emulator.records(DOMAIN, kind)) == before
    assert deletes(emulator) == []
    real = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, kind)
    assert real.deleted > 0 or real.status == "guarded"
    assert dry.as_json() | {"error": None} == real.as_json() | {"error": None}
    assert dry.error == real.error
