"""Webhooks and the full reconcile together: a webhook landing while a reconcile of the same list
is under way survives it, the next reconcile agrees with what the webhook wrote, and webhook rows
are never pushed back to Mailgun."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import API_KEY, DOMAIN
from tests.support.mirror import insert_row, rows
from tests.support.webhooks import SIGNING_KEY, deliver, event, webhook_app
from worker.emulator import Fault
from worker.records import SuppressionList
from worker.settings import Settings

BOUNCES, UNSUBSCRIBES = SuppressionList.BOUNCES, SuppressionList.UNSUBSCRIBES
EVENT_TIME = int(time.time()) - 60


def wire_time(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%a, %d %b %Y %H:%M:%S UTC")


@pytest.fixture
async def http(pool, client, emulator, aiohttp_client):
    settings = Settings(api_key=API_KEY, api_base=str(emulator.base_url), domains=(DOMAIN,),
                        webhook_signing_key=SIGNING_KEY)
    async with webhook_app(pool, client, settings) as app:
        yield await aiohttp_client(app)


async def wait_for(condition) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out waiting")


async def reconcile(make_reconciler, kind=BOUNCES):
    return await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, kind)


async def test_a_webhook_between_the_pull_and_the_apply_of_a_run_survives_it(
        http, pool, emulator, make_reconciler):
    # The mirror holds a bounce Mailgun no longer lists: left alone, the run would remove it.
    await insert_row(pool, BOUNCES, DOMAIN, "again@example.com", state="synced",
                     synced_at=datetime.now(UTC) - timedelta(hours=1))
    # The run reads Mailgun's (empty) list, then is held before it applies anything.
    emulator.inject(Fault(action="delay_after", delay_s=1.5, method="GET", list="bounces"))
    run = asyncio.create_task(reconcile(make_reconciler))
    await wait_for(lambda: any(r.method == "GET" for r in emulator.requests))

    # Meanwhile Mailgun bounces that address again, and a new one, and says so.
    for address in ("again@example.com", "new@example.com"):
        answer = await deliver(http, event("failed", address, DOMAIN, timestamp=EVENT_TIME, code=550))
        assert answer == (200, "stored")
    assert not run.done()
    result = await run

    assert (result.status, result.removed, result.inserted) == ("ok", 0, 0)
    mirror = await rows(pool, BOUNCES)
    assert sorted(mirror) == ["again@example.com", "new@example.com"]
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}


async def test_the_next_reconcile_agrees_with_the_webhooks_and_pushes_nothing_back(
        http, pool, emulator, make_reconciler):
    for address in ("one@example.com", "two@example.com"):
        bounce = event("failed", address, DOMAIN, timestamp=EVENT_TIME, code=550)
        assert (await deliver(http, bounce))[0] == 200
    assert (await deliver(http, event("unsubscribed", "u@example.com", DOMAIN, timestamp=EVENT_TIME,
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
        assert result.counts() == (2 if kind is BOUNCES else 1, 0, 0, 0, 0, 0, 0, 0)

    assert await rows(pool, BOUNCES) == before
    assert not [r for r in emulator.requests if r.method != "GET"]


async def test_a_webhook_row_mailgun_does_not_have_is_removed_by_a_later_reconcile(
        http, pool, emulator, make_reconciler):
    """The reconcile is the backstop: Mailgun's lists win over anything a webhook wrote."""
    assert (await deliver(http, event("complained", "test@example.com", DOMAIN)))[0] == 200
    await asyncio.sleep(0.01)
    result = await reconcile(make_reconciler, SuppressionList.COMPLAINTS)
    assert (result.status, result.removed, result.pushed) == ("ok", 1, 0)
    assert await rows(pool, SuppressionList.COMPLAINTS) == {}
