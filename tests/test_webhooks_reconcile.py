"""Webhooks and the full reconcile together: a webhook landing while a reconcile of the same list
is under way survives it, the next reconcile agrees with what the webhook wrote, and webhook rows
are never pushed back to Mailgun."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

from tests.support.account import DOMAIN
from tests.support.mirror import insert_row, rows
from tests.support.waiting import wait_for
from tests.support.webhooks import deliver, event
from worker.emulator import Fault
from worker.records import SuppressionList

BOUNCES, UNSUBSCRIBES = SuppressionList.BOUNCES, SuppressionList.UNSUBSCRIBES
EVENT_TIME = int(time.time()) - 60


def wire_time(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%a, %d %b %Y %H:%M:%S UTC")



async def reconcile(make_reconciler, kind=BOUNCES):
    return await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, kind)


async def test_a_webhook_between_the_pull_and_the_apply_of_a_run_survives_it(
        webhook_http, pool, emulator, make_reconciler):
    # The mirror holds a bounce Mailgun no longer lists: left alone, the run would remove it.
    await insert_row(pool, BOUNCES, DOMAIN, "again@example.com", state="synced",
                     synced_at=datetime.now(UTC) - timedelta(hours=1))
    # The run reads Mailgun's (empty) list, then is held before it applies anything.
    emulator.inject(Fault(action="delay_after", delay_s=1.5, method="GET", list="bounces"))
    run = asyncio.create_task(reconcile(make_reconciler))
    await wait_for(lambda: any(r.method == "GET" for r in emulator.requests))

    # Meanwhile Mailgun bounces that address again, and a new one, and says so.
    for address in ("again@example.com", "new@example.com"):
        answer = await deliver(webhook_http, event("failed", address, DOMAIN, timestamp=EVENT_TIME, code=550))
        assert answer == (200, "stored")
    assert not run.done()
    result = await run

    assert (result.status, result.removed, result.inserted) == ("ok", 0, 0)
    mirror = await rows(pool, BOUNCES)
    assert sorted(mirror) == ["again@example.com", "new@example.com"]
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}


async def test_the_next_reconcile_agrees_with_the_webhooks_and_pushes_nothing_back(
        webhook_http, pool, emulator, make_reconciler):
    for address in ("one@example.com", "two@example.com"):
        bounce = event("failed", address, DOMAIN, timestamp=EVENT_TIME, code=550)
        assert (await deliver(webhook_http, bounce))[0] == 200
    assert (await deliver(webhook_http, event("unsubscribed", "u@example.com", DOMAIN, timestamp=EVENT_TIME,
                                      tags=["news"])))[0] == 200
    # What Mailgun's lists hold after those events.
    emulator.seed(DOMAIN, BOUNCES, [{"address": a, "code": "550", "error": "550 5.1.1 mailbox unavailable",
                                     "created_at": wire_time(EVENT_TIME)}
                                    for a in ("one@example.com", "two@example.com")])
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "u@example.com", "tags": ["news"],
                                          "created_at": wire_time(EVENT_TIME)}])
    await asyncio.sleep(0.01)  # the runs' pulls start after the webhooks' writes
    before = await rows(pool, BOUNCES)

    for kind in (BOUNCES, UNSUBSCRIBES):
        result = await reconcile(make_reconciler, kind)
        assert result.counts() == (2 if kind is BOUNCES else 1, 0, 0, 0, 0, 0, 0, 0, 0)

    assert await rows(pool, BOUNCES) == before
    assert not [r for r in emulator.requests if r.method != "GET"]


async def test_a_webhook_row_mailgun_does_not_have_is_removed_by_a_later_reconcile(
        webhook_http, pool, emulator, make_reconciler):
    """The reconcile is the backstop: Mailgun's lists win over anything a webhook wrote."""
    assert (await deliver(webhook_http, event("complained", "test@example.com", DOMAIN)))[0] == 200
    await asyncio.sleep(0.01)
    result = await reconcile(make_reconciler, SuppressionList.COMPLAINTS)
    assert (result.status, result.removed, result.pushed) == ("ok", 1, 0)
    assert await rows(pool, SuppressionList.COMPLAINTS) == {}


# ---- a webhook newer than an application's removal ----------------------------------------------

async def synced_bounce(pool, emulator, address: str, seconds: int) -> None:
    emulator.seed(DOMAIN, BOUNCES, [{"address": address, "code": "550", "created_at": wire_time(seconds)}])
    await insert_row(pool, BOUNCES, DOMAIN, address, state="synced",
                     synced_at=datetime.now(UTC) - timedelta(hours=1),
                     created_at=datetime.fromtimestamp(seconds, UTC))


async def test_a_webhook_newer_than_a_removal_whose_delete_is_in_flight_wins_on_both_sides(
        webhook_http, pool, emulator, make_reconciler):
    await synced_bounce(pool, emulator, "back@example.com", EVENT_TIME - 3600)
    await pool.execute("DELETE FROM mailgun.bounces WHERE address = 'back@example.com'")
    # The run's DELETE is held by Mailgun; meanwhile the address bounces again at Mailgun, and the
    # webhook says so. Mailgun then carries out the DELETE, which takes the new bounce with it.
    emulator.inject(Fault(action="delay", delay_s=0.5, method="DELETE"))
    run = asyncio.create_task(reconcile(make_reconciler))
    await wait_for(lambda: any(r.method == "DELETE" for r in emulator.requests))
    now = time.time()
    emulator.seed(DOMAIN, BOUNCES, [{"address": "back@example.com", "code": "550",
                                     "created_at": wire_time(int(now))}])
    bounced = event("failed", "back@example.com", DOMAIN, timestamp=now)
    assert await deliver(webhook_http, bounced) == (200, "stored")
    first = await run
    assert first.status == "ok", first.error
    second = await reconcile(make_reconciler)

    # The newest event is Mailgun's bounce: both sides have the address.
    assert second.status == "ok", second.error
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == ["back@example.com"]
    assert (await rows(pool, BOUNCES))["back@example.com"]["sync_state"] == "synced"


async def test_a_webhook_later_in_the_same_second_as_a_removal_is_newer(webhook_http, pool, emulator):
    await synced_bounce(pool, emulator, "same@example.com", EVENT_TIME - 3600)
    await pool.execute("DELETE FROM mailgun.bounces WHERE address = 'same@example.com'")
    removed_at = await pool.fetchval("SELECT removed_at FROM mailgun.removals")
    # An event a few milliseconds after the removal, within the same whole second.
    later = removed_at.timestamp() + 0.001

    answer = await deliver(webhook_http, event("failed", "same@example.com", DOMAIN, timestamp=later))

    assert answer == (200, "stored")
    assert await pool.fetchval("SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL") == 0


async def test_a_webhook_older_than_a_carried_out_removal_stays_superseded(webhook_http, pool, emulator,
                                                                           make_reconciler):
    await synced_bounce(pool, emulator, "old@example.com", EVENT_TIME - 3600)
    await pool.execute("DELETE FROM mailgun.bounces WHERE address = 'old@example.com'")
    removed_at = await pool.fetchval("SELECT removed_at FROM mailgun.removals")
    assert (await reconcile(make_reconciler)).deleted == 1

    # Delivered late (Mailgun retries for hours), about an event from before the removal.
    late = event("failed", "old@example.com", DOMAIN, timestamp=removed_at.timestamp() - 5)
    assert await deliver(webhook_http, late) == (200, "superseded")
    assert await rows(pool, BOUNCES) == {}
