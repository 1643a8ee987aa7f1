"""Every cell of the row-state table: (no row | pending | synced | rejected) x (Mailgun has the
record unchanged | changed | not at all), for one reconcile."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.support.account import DOMAIN
from tests.support.mirror import changes, insert_row, rows
from worker.records import SuppressionList

BOUNCES = SuppressionList.BOUNCES
UNSUBSCRIBES = SuppressionList.UNSUBSCRIBES
ADDRESS = "row@example.com"
CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
WIRE_CREATED = "Fri, 02 Jan 2026 03:04:05 UTC"
AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)

LOCAL = {"code": "550", "error": "mailbox full", "created_at": CREATED}
REMOTE_SAME = {"address": ADDRESS, "code": "550", "error": "mailbox full", "created_at": WIRE_CREATED}
REMOTE_CHANGED = {**REMOTE_SAME, "code": "554", "error": "blocked"}


async def arrange(pool, emulator, local_state, remote):
    if local_state is not None:
        synced_at = AN_HOUR_AGO if local_state == "synced" else None
        await insert_row(pool, BOUNCES, DOMAIN, ADDRESS, state=local_state, synced_at=synced_at,
                         sync_error="refused earlier" if local_state == "rejected" else None, **LOCAL)
    if remote is not None:
        emulator.seed(DOMAIN, BOUNCES, [remote])


async def reconcile(make_reconciler, **options):
    return await make_reconciler(**options).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)


@pytest.mark.parametrize(("local_state", "remote", "state", "code", "counts"), [
    # pending: an application's own addition
    ("pending", REMOTE_SAME, "synced", "550", {"adopted": 1}),
    ("pending", REMOTE_CHANGED, "synced", "554", {"adopted": 1}),
    ("pending", None, "synced", "550", {"pushed": 1}),
    # synced: the mirror already agreed with Mailgun
    ("synced", REMOTE_SAME, "synced", "550", {}),
    ("synced", REMOTE_CHANGED, "synced", "554", {"updated": 1}),
    ("synced", None, None, None, {"removed": 1}),
    # rejected: refused locally or by Mailgun before
    ("rejected", REMOTE_SAME, "synced", "550", {"adopted": 1}),
    ("rejected", REMOTE_CHANGED, "synced", "554", {"adopted": 1}),
    ("rejected", None, "rejected", "550", {}),
    # no row in the mirror
    (None, REMOTE_SAME, "synced", "550", {"inserted": 1}),
    (None, REMOTE_CHANGED, "synced", "554", {"inserted": 1}),
], ids=lambda v: v if isinstance(v, str) else None)
async def test_state_table_cell(pool, emulator, make_reconciler, local_state, remote, state, code, counts):
    await arrange(pool, emulator, local_state, remote)
    result = await reconcile(make_reconciler)

    assert result.status == "ok"
    for field in ("inserted", "updated", "removed", "adopted", "pushed", "rejected"):
        assert getattr(result, field) == counts.get(field, 0), field
    mirror = await rows(pool, BOUNCES)
    if state is None:
        assert mirror == {}
    else:
        assert mirror[ADDRESS]["sync_state"] == state
        assert mirror[ADDRESS]["code"] == code
    if state == "synced":
        assert [r["code"] for r in emulator.records(DOMAIN, BOUNCES)] == [code]
    if local_state == "rejected" and remote is None:
        assert mirror[ADDRESS]["sync_error"] == "refused earlier"
        assert not [r for r in emulator.requests if r.method == "POST"]


async def test_every_change_is_logged_with_its_run(pool, emulator, make_reconciler):
    await insert_row(pool, BOUNCES, DOMAIN, "push@example.com")
    await insert_row(pool, BOUNCES, DOMAIN, "gone@example.com", state="synced", synced_at=AN_HOUR_AGO)
    emulator.seed(DOMAIN, BOUNCES, [{"address": "new@example.com"}])
    await reconcile(make_reconciler)
    assert sorted(await changes(pool)) == [
        ("bounces", "gone@example.com", "remove"),
        ("bounces", "new@example.com", "insert"),
        ("bounces", "push@example.com", "push"),
    ]
    run = await pool.fetchrow("SELECT * FROM mailgun.sync_runs")
    assert (run["status"], run["pulled"], run["inserted"], run["removed"], run["pushed"]) == (
        "ok", 1, 1, 1, 1)
    assert run["finished_at"] >= run["started_at"]


async def test_a_row_changed_by_the_application_after_rejection_is_retried(pool, emulator, make_reconciler):
    await insert_row(pool, BOUNCES, DOMAIN, "typo@example", state="rejected", sync_error="invalid")
    await pool.execute("UPDATE mailgun.bounces SET address = 'fixed@example.com'")
    [row] = (await rows(pool, BOUNCES)).values()
    assert (row["sync_state"], row["sync_error"]) == ("pending", None)
    result = await reconcile(make_reconciler)
    assert result.pushed == 1
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["fixed@example.com"]


async def test_an_invalid_local_address_is_rejected_with_a_reason_and_not_sent(
        pool, emulator, make_reconciler):
    await insert_row(pool, BOUNCES, DOMAIN, "x'); DROP TABLE mailgun.bounces;--@example.com")
    await insert_row(pool, BOUNCES, DOMAIN, "no-at-sign")
    await insert_row(pool, BOUNCES, DOMAIN, "ok@example.com")
    result = await reconcile(make_reconciler)
    assert (result.pushed, result.rejected) == (1, 2)
    mirror = await rows(pool, BOUNCES)
    assert mirror["no-at-sign"]["sync_state"] == "rejected"
    assert "@-sign" in mirror["no-at-sign"]["sync_error"]
    assert mirror["ok@example.com"]["sync_state"] == "synced"
    # A second run does not send the refused rows again.
    emulator.requests.clear()
    again = await reconcile(make_reconciler)
    assert (again.pushed, again.rejected) == (0, 0)
    assert not [r for r in emulator.requests if r.method == "POST"]


async def test_a_record_mailgun_refuses_is_rejected_with_its_message(pool, emulator, make_reconciler):
    await insert_row(pool, BOUNCES, DOMAIN, "refused@example.com")
    await insert_row(pool, BOUNCES, DOMAIN, "fine@example.com")
    emulator.fail_next(400, times=None, method="POST", body_contains="refused@",
                       message="Invalid format for parameter address: refused@example.com")
    result = await reconcile(make_reconciler)
    assert (result.pushed, result.rejected) == (1, 1)
    mirror = await rows(pool, BOUNCES)
    assert mirror["refused@example.com"]["sync_error"] == \
        "Invalid format for parameter address: refused@example.com"
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["fine@example.com"]


async def test_addresses_differing_only_by_case_are_one_row_spelled_as_mailgun_does(
        pool, emulator, make_reconciler):
    await insert_row(pool, BOUNCES, DOMAIN, "Mixed.Case@Example.com")
    emulator.seed(DOMAIN, BOUNCES, [{"address": "mixed.case@example.com"}])
    result = await reconcile(make_reconciler)
    assert (result.inserted, result.removed, result.adopted, result.pushed) == (0, 0, 1, 0)
    assert list(await rows(pool, BOUNCES)) == ["mixed.case@example.com"]


async def test_pending_unsubscribe_takes_the_union_of_tags_and_pushes_the_missing_ones(
        pool, emulator, make_reconciler):
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, ADDRESS, tags=["promo", "news"])
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": ADDRESS, "tags": ["news", "billing"]}])
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)
    assert result.pushed == 1
    row = (await rows(pool, UNSUBSCRIBES))[ADDRESS]
    assert (row["tags"], row["sync_state"]) == (["billing", "news", "promo"], "synced")
    assert emulator.records(DOMAIN, UNSUBSCRIBES)[0]["tags"] == ["billing", "news", "promo"]


async def test_synced_unsubscribe_takes_mailguns_tags(pool, emulator, make_reconciler):
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, ADDRESS, tags=["news"], state="synced",
                     synced_at=AN_HOUR_AGO)
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": ADDRESS, "tags": ["*"]}])
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)
    assert (result.updated, result.pushed) == (1, 0)
    assert (await rows(pool, UNSUBSCRIBES))[ADDRESS]["tags"] == ["*"]


async def test_a_plain_application_insert_is_a_pending_addition(pool):
    await pool.execute("INSERT INTO mailgun.unsubscribes (domain, address) VALUES ($1, $2)", DOMAIN, ADDRESS)
    row = (await rows(pool, UNSUBSCRIBES))[ADDRESS]
    assert (row["sync_state"], row["tags"], row["synced_at"]) == ("pending", ["*"], None)


async def test_a_rejected_unsubscribe_mailgun_has_is_synced_not_resent(pool, emulator, make_reconciler):
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, "u@example.com", state="rejected",
                     sync_error="refused", tags=["news", "promo"])
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "u@example.com", "tags": ["news"]}])
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)
    assert (result.adopted, result.pushed) == (1, 0)
    row = (await rows(pool, UNSUBSCRIBES))["u@example.com"]
    assert (row["sync_state"], row["tags"]) == ("synced", ["news"])
