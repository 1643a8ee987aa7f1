"""Pushing records: batches of at most 1000, one form post each for the allowlist, and a refused
record never holding back the rest of its batch."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.support.account import DOMAIN
from worker import errors
from worker.emulator import Fault
from worker.mailgun import PushOutcome
from worker.records import Record, SuppressionList

BOUNCES = SuppressionList.BOUNCES


def bounces(count: int, start: int = 0) -> list[Record]:
    return [Record(f"push{i:05}@example.com", code="550", error="mailbox full")
            for i in range(start, start + count)]


async def push_all(client, kind, records, **options) -> PushOutcome:
    total = PushOutcome()
    async for outcome in client.push(DOMAIN, kind, records, **options):
        total.extend(outcome)
    return total


async def test_push_sends_2500_records_in_batches_of_at_most_1000(emulator, client):
    outcome = await push_all(client, BOUNCES, bounces(2500))
    assert len(outcome.accepted) == 2500
    assert outcome.rejected == []
    posts = [r for r in emulator.requests if r.method == "POST"]
    assert sorted(len(r.json()) for r in posts) == [500, 1000, 1000]
    assert all(r.content_type == "application/json" for r in posts)
    assert len(emulator.records(DOMAIN, BOUNCES)) == 2500


async def test_pushed_fields_arrive_as_mailgun_documents_them(emulator, client):
    moment = datetime(2026, 3, 26, 12, 59, 15, tzinfo=UTC)
    await push_all(client, SuppressionList.UNSUBSCRIBES,
                   [Record("u@example.com", moment, tags=("news", "promo"))])
    [post] = emulator.requests
    assert post.json() == [{"address": "u@example.com", "tags": ["news", "promo"],
                            "created_at": "Thu, 26 Mar 2026 12:59:15 UTC"}]
    assert emulator.records(DOMAIN, "unsubscribes")[0]["tags"] == ["news", "promo"]


async def test_one_refused_record_is_found_and_the_other_999_are_stored(emulator, client):
    records = bounces(1000)
    records[637] = Record("not-an-address", code="550")
    outcome = await push_all(client, BOUNCES, records)
    assert [r.record.address for r in outcome.rejected] == ["not-an-address"]
    assert outcome.rejected[0].reason == "Invalid format for parameter address: not-an-address"
    assert len(outcome.accepted) == 999
    assert len(emulator.records(DOMAIN, BOUNCES)) == 999
    # Halving finds one bad record in about 2 * log2(1000) requests, not 1000.
    assert len(emulator.requests) <= 25


async def test_allowlist_entries_go_one_form_post_each(emulator, client):
    entries = [Record("vip@example.com", entry_type="address", reason="ceo"),
               Record("partner.example.org", entry_type="domain"),
               Record("bad address@", entry_type="address")]
    outcome = await push_all(client, SuppressionList.ALLOWLIST, entries)
    assert sorted(r.address for r in outcome.accepted) == ["partner.example.org", "vip@example.com"]
    assert [r.record.address for r in outcome.rejected] == ["bad address@"]
    forms = sorted(r.body.decode() for r in emulator.requests)
    assert "domain=partner.example.org" in forms
    assert "address=vip%40example.com&reason=ceo" in forms
    assert all(r.content_type == "application/x-www-form-urlencoded" for r in emulator.requests)


async def test_push_retries_5xx_and_stores_the_batch_once(emulator, client, sleeps):
    emulator.fail_next(503, times=2, method="POST")
    outcome = await push_all(client, BOUNCES, bounces(10))
    assert len(outcome.accepted) == 10
    assert [r.status for r in emulator.requests] == [503, 503, 200]
    assert len(sleeps.waits) == 2
    assert len(emulator.records(DOMAIN, BOUNCES)) == 10


async def test_push_that_keeps_failing_confirms_nothing(emulator, client):
    emulator.fail_next(500, times=None, method="POST")
    with pytest.raises(errors.MailgunUnavailableError, match="after 4 attempts"):
        await push_all(client, BOUNCES, bounces(5))
    assert emulator.records(DOMAIN, BOUNCES) == []


async def test_push_with_a_wrong_key_raises_and_is_not_retried(emulator, make_client):
    with pytest.raises(errors.MailgunAuthError):
        await push_all(make_client(api_key="key-bad"), BOUNCES, bounces(3))
    assert len(emulator.requests) == 1


async def test_concurrent_batches_are_bounded(emulator, make_client):
    emulator.inject(Fault(action="delay", delay_s=0.05, times=None, method="POST"))
    client = make_client(push_concurrency=3)
    seen = 0
    async for _ in client.push(DOMAIN, BOUNCES, bounces(10), batch_size=1):
        seen += 1
    assert seen == 10
    assert len(emulator.records(DOMAIN, BOUNCES)) == 10


async def test_a_batch_over_1000_is_refused_before_sending(client, emulator):
    with pytest.raises(ValueError, match="at most 1000"):
        await client.push_batch(DOMAIN, BOUNCES, bounces(1001))
    assert len(emulator.requests) == 0
