"""The legacy offset pager (`skip`/`total_count`): a record deleted before the offset mid-pull
shifts the rest, and the record that slides under the offset must not go unread and be removed."""

from __future__ import annotations

import asyncio
import uuid

from tests.support.account import DOMAIN
from tests.support.mirror import rows
from worker.emulator import Fault
from worker.records import SuppressionList

BOUNCES = SuppressionList.BOUNCES
ADDRESSES = [f"b{i:02}@example.com" for i in range(10)]


async def test_a_record_deleted_before_the_offset_mid_pull_does_not_make_a_run_remove_another(
        pool, emulator, make_client, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [{"address": a} for a in ADDRESSES])
    reconciler = make_reconciler(make_client(page_limit=3, api_version="v2"))
    first = await reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (first.status, first.inserted) == ("ok", 10)
    # The second page is held while b01 (on the first page) is deleted at Mailgun: b03 slides
    # from offset 3 to offset 2, which the pager has already passed.
    emulator.inject(Fault(action="delay", delay_s=0.3, path_contains="/v2/", skip=1))
    running = asyncio.create_task(reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES))
    await asyncio.sleep(0.15)
    emulator.remove(DOMAIN, BOUNCES, "b01@example.com")
    second = await running

    assert (second.status, second.removed) == ("ok", 1)
    assert set(await rows(pool, BOUNCES)) == set(ADDRESSES) - {"b01@example.com"}


async def test_an_offset_pull_whose_list_keeps_shifting_fails_and_removes_nothing(
        pool, emulator, make_client, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [{"address": a} for a in ADDRESSES])
    reconciler = make_reconciler(make_client(page_limit=3, api_version="v2"))
    assert (await reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)).inserted == 10
    # Whenever a page after the first is asked for, the list's first record goes before it is read.
    emulator.inject(Fault(action="delay", delay_s=0.1, path_contains="/v2/", times=None))
    running = asyncio.create_task(reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES))
    seen = 0
    while not running.done():
        asked = [r for r in list(emulator.requests)[seen:] if "skip" in r.query]
        seen = len(emulator.requests)
        for _ in asked:
            emulator.remove(DOMAIN, BOUNCES, emulator.records(DOMAIN, BOUNCES)[0]["address"])
        await asyncio.sleep(0.01)
    result = await running

    assert result.status == "failed"
    assert "changed during the pull" in str(result.error)
    assert len(await rows(pool, BOUNCES)) == 10


async def test_records_added_before_the_offset_mid_pull_are_no_reason_to_read_again(
        emulator, make_client):
    emulator.seed(DOMAIN, BOUNCES, [{"address": a} for a in ADDRESSES])
    client = make_client(page_limit=3, api_version="v2")
    read: list[str] = []
    async for page in client.pages(DOMAIN, BOUNCES):
        read += [r.address for r in page.records]
        if page.number == 1:
            emulator.seed(DOMAIN, BOUNCES, [{"address": "a0@example.com"}, {"address": "a1@example.com"}])
    assert read == ADDRESSES
