"""Bad input, from Mailgun or from the application: a clear error naming the problem, and every
other record left intact."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from tests.support.account import DOMAIN
from tests.support.mirror import insert_row, rows, snapshot
from worker.emulator import Fault
from worker.records import SuppressionList

BOUNCES = SuppressionList.BOUNCES


def corrupt(emulator, stored: str, **fields: object) -> None:
    """Make one stored record say something Mailgun's API never should."""
    row = emulator.tables.table(DOMAIN, BOUNCES).get(stored)
    row.update(fields)


# A field of another JSON type than the API's is a page not in Mailgun's shape: nothing on it can
# be trusted. (Values the mirror cannot hold are skipped instead: test_unholdable_records.py.)
@pytest.mark.parametrize(("fields", "named"), [
    ({"code": {"nested": 550}}, "field 'code' is dict"),
    ({"created_at": 1700000000}, "field 'created_at' is int"),
    ({"address": 5}, "no text 'address'"),
], ids=["code object", "date number", "address number"])
async def test_a_record_not_in_the_api_shape_fails_the_list_and_changes_nothing(
        pool, emulator, make_reconciler, fields, named):
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"ok{i}@example.com"} for i in range(5)])
    await insert_row(pool, BOUNCES, DOMAIN, "kept@example.com", state="synced")
    corrupt(emulator, "ok2@example.com", **fields)
    before = await snapshot(pool)

    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert result.status == "failed"
    assert named in str(result.error)
    assert "pull incomplete, nothing changed" in str(result.error)
    after = await snapshot(pool)
    assert after["bounces"] == before["bounces"]


async def test_codes_and_dates_in_every_form_mailgun_has_used_are_read(pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"f{i}@example.com"} for i in range(5)])
    corrupt(emulator, "f0@example.com", code=550, created_at="Fri, 21 Oct 2011 11:02:55 GMT")
    corrupt(emulator, "f1@example.com", code="5.1.1", created_at="Thu, 13 Oct 2011 18:02:00 +0000")
    corrupt(emulator, "f2@example.com", code=550.0, created_at="2011-10-13T18:02:00.000Z")
    corrupt(emulator, "f3@example.com", created_at="Thu, 13 Oct 2011 20:02:00 +0200")
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (result.status, result.inserted) == ("ok", 5)
    mirror = await rows(pool, BOUNCES)
    assert [mirror[f"f{i}@example.com"]["code"] for i in range(3)] == ["550", "5.1.1", "550.0"]
    assert mirror["f1@example.com"]["created_at"] == mirror["f3@example.com"]["created_at"]


async def test_unicode_addresses_are_pushed_and_mirrored(pool, emulator, make_reconciler):
    for address in ("用户@例子.广告", "josé.garcía@correo.es", "müller@bücher.de"):
        await insert_row(pool, BOUNCES, DOMAIN, address)
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (result.pushed, result.rejected) == (3, 0)
    assert {r["address"] for r in emulator.records(DOMAIN, BOUNCES)} == {
        "用户@例子.广告", "josé.garcía@correo.es", "müller@bücher.de"}
    again = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert again.changes() == 0


async def test_the_application_cannot_insert_one_mailbox_twice(pool):
    await insert_row(pool, BOUNCES, DOMAIN, "Twice@Example.com")
    with pytest.raises(asyncpg.UniqueViolationError):
        await insert_row(pool, BOUNCES, DOMAIN, "twice@example.com")


async def test_the_application_cannot_insert_an_absurd_address(pool):
    with pytest.raises(asyncpg.CheckViolationError):
        await insert_row(pool, BOUNCES, DOMAIN, "y" * 600 + "@example.com")


async def test_a_row_inserted_during_a_run_is_pushed_by_this_run_or_the_next(pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"r{i}@example.com"} for i in range(30)])
    emulator.inject(Fault(action="delay", delay_s=0.3, method="GET", page="next"))
    running = asyncio.create_task(make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES))
    await asyncio.sleep(0.1)
    await insert_row(pool, BOUNCES, DOMAIN, "late@example.com")
    first = await running
    assert first.status == "ok"
    second = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert second.status == "ok"
    assert "late@example.com" in {r["address"] for r in emulator.records(DOMAIN, BOUNCES)}
    assert (await rows(pool, BOUNCES))["late@example.com"]["sync_state"] == "synced"
