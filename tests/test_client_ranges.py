"""Reading a list in parallel keyset ranges: every record exactly once, whatever the pivots."""

from __future__ import annotations

import asyncio
import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.account import DOMAIN
from worker import errors
from worker.emulator import EmulatorSettings, Fault
from worker.mailgun.retry import RetryPolicy
from worker.records import SuppressionList

BOUNCES = SuppressionList.BOUNCES


async def ranged(client, pivots) -> list[str]:
    return [row[1] async for page in client.ranged_pages(DOMAIN, BOUNCES, pivots) for row in page.rows]


def seed(emulator, addresses) -> list[str]:
    emulator.seed(DOMAIN, BOUNCES, [{"address": a} for a in addresses])
    return sorted(addresses)


ADDRESSES = [f"{p}{i}@example.com" for p in ("ann", "anna", "annabel", "bob", "zed") for i in range(7)]


@pytest.mark.parametrize("pivots", [
    [],                                                    # one range: the whole list
    ["anna"],                                              # a pivot that is a shared prefix
    ["anna3@example.com"],                                 # a pivot equal to a record
    ["anna3@example.com", "anna3@example.com"],            # the same pivot twice
    ["b", "bo", "bob"],                                    # pivots with no record between them
    ["a", "ann0@example.com", "annabel9", "c", "zzz"],     # before the first, after the last
    ["nobody@example.com"],                                # a pivot that no longer exists
], ids=lambda p: "|".join(p) or "none")
async def test_every_record_once_whatever_the_pivots(emulator, make_client, pivots):
    expected = seed(emulator, ADDRESSES)
    pulled = await ranged(make_client(page_limit=3), pivots)
    assert sorted(pulled) == expected
    assert len(pulled) == len(set(pulled))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(addresses=st.sets(st.from_regex(r"[a-c]{1,4}@x\.io", fullmatch=True), max_size=40),
       pivots=st.lists(st.from_regex(r"[a-c]{0,5}(@x\.io)?", fullmatch=True), max_size=6),
       limit=st.integers(1, 5))
async def test_ranges_partition_any_list(emulator, make_client, addresses, pivots, limit):
    emulator.reset()
    emulator.declare(DOMAIN)
    expected = seed(emulator, addresses)
    pulled = await ranged(make_client(page_limit=limit), pivots)
    assert sorted(pulled) == expected
    assert len(pulled) == len(set(pulled))


async def test_records_added_or_removed_during_the_pull_never_repeat(emulator, make_client):
    stable = [f"s{i:03}@example.com" for i in range(60)]
    seed(emulator, stable)
    emulator.inject(Fault(action="delay", delay_s=0.05, times=None))
    client = make_client(page_limit=5)

    async def churn() -> None:
        for i in range(20):
            emulator.seed(DOMAIN, BOUNCES, [{"address": f"s{i:03}x@example.com"}])
            emulator.remove(DOMAIN, BOUNCES, f"s{59 - i:03}@example.com")
            await asyncio.sleep(0.01)

    pulled, _ = await asyncio.gather(ranged(client, ["s020", "s040"]), churn())
    counts = collections.Counter(pulled)
    assert max(counts.values()) == 1
    # Everything present from start to end was read.
    assert set(stable[:40]) <= set(pulled)


@pytest.mark.parametrize("emulator_settings", [EmulatorSettings(case_sensitive=False)])
async def test_an_unexpected_server_order_is_detected(emulator, make_client):
    # Folding case, the server lists "apple" before "Banana"; code-point order is the other way.
    seed(emulator, ["apple@example.com", "Banana@example.com", "cherry@example.com"])
    with pytest.raises(errors.PagingOrderError, match="not in code-point order"):
        await ranged(make_client(page_limit=2), ["b"])


@pytest.mark.parametrize("emulator_settings", [EmulatorSettings(case_sensitive=False)])
async def test_a_pivot_mailgun_does_not_have_cannot_hide_records_between_ranges(emulator, make_client):
    # Case-blind order: "a_@x.com" < "aB..." there, but "aB..." < "a_@x.com" in code points.
    emulator.seed(DOMAIN, BOUNCES, [{"address": a} for a in
                                    ("a1@x.com", "a_@x.com", "ac@x.com", "b@x.com", "c@x.com")])
    client = make_client(page_limit=2)
    with pytest.raises(errors.PagingOrderError):
        _ = [p async for p in client.ranged_pages(DOMAIN, BOUNCES, ["aB@x.com"])]


async def test_a_failing_range_stops_them_all(emulator, make_client):
    seed(emulator, ADDRESSES)
    emulator.fail_next(500, times=None, path_contains="bounces", page="next")
    with pytest.raises(errors.MailgunUnavailableError):
        await ranged(make_client(page_limit=3), ["anna", "bob"])


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


@pytest.mark.parametrize("emulator_settings", [EmulatorSettings(rate_limit=12, rate_window_s=1.0)])
async def test_parallel_ranges_keep_within_the_request_budget(emulator, make_client):
    expected = seed(emulator, [f"b{i:03}@example.com" for i in range(120)])
    # Real sleeps: the budget's waits must really let the window turn.
    client = make_client(page_limit=5, retry=RetryPolicy(max_attempts=4, backoff_max=5.0))
    pulled = await ranged(client, ["b030", "b060", "b090"])
    assert sorted(pulled) == expected
    statuses = [r.status for r in emulator.requests]
    assert len(statuses) > 2 * 12  # the pull needed more than two windows' budget
    assert statuses.count(429) == 0


# Reference §5.5: the Domains API has a limit of its own (300 requests a minute per account).
@pytest.mark.parametrize("emulator_settings", [EmulatorSettings(domains_rate_limit=1)])
async def test_listing_the_account_domains_does_not_spend_the_suppression_lists_budget(
        emulator, make_client, sleeps):
    client = make_client()
    assert [d.name for d in await client.account_domains()] == [DOMAIN]
    assert emulator.requests[-1].status == 200  # and its own budget is now spent
    seed(emulator, ["a@example.com", "b@example.com"])
    assert [r.address async for r in client.records(DOMAIN, SuppressionList.BOUNCES)] == [
        "a@example.com", "b@example.com"]
    assert sleeps.waits == []
