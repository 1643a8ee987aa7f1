"""How long one request may wait: the request budget and the retries each wait at most
`backoff_max` at a time, the budget at most once per attempt, whatever the server's reset says;
a reset in the past or in other units never makes the retries fire all at once."""

from __future__ import annotations

import time

import pytest
from structlog.testing import capture_logs

from tests.support.account import DOMAIN
from tests.support.waiting import SleepLog
from worker.mailgun.budget import RequestBudget, seconds_until_reset
from worker.mailgun.retry import RetryPolicy, server_wait_hint
from worker.records import SuppressionList

BOUNCES = SuppressionList.BOUNCES
TWO_HOURS_MS = 2 * 3600 * 1000


async def pull(client) -> list:
    return [record async for record in client.records(DOMAIN, BOUNCES)]


def spent(reset: str, remaining: int = 0) -> dict[str, str]:
    return {"X-Request-Limit": "2500", "X-Request-Remaining": str(remaining), "X-Request-Reset": reset}


async def test_a_reset_two_hours_ahead_costs_one_capped_wait_not_hours(emulator, make_client, sleeps):
    emulator.fail_next(429, reset_in_ms=TWO_HOURS_MS)
    with capture_logs() as logs:
        await pull(make_client(retry=RetryPolicy(max_attempts=6, backoff_max=60.0, sleep=sleeps)))

    # The retry's wait, capped; the budget's turn, capped too, is the same moment (here the
    # waits are recorded, not slept, so the budget still sees it ahead).
    assert sleeps.waits[0] == 60.0
    assert len(sleeps.waits) == 2 and 59 < sleeps.waits[1] <= 60.0
    implausible = [e for e in logs if e["event"] == "request_reset_implausible"]
    assert len(implausible) == 1 and implausible[0]["capped_s"] == 60.0
    assert len([e for e in logs if e["event"] == "request_budget_wait"]) == 1


async def test_a_reset_that_stays_far_ahead_still_bounds_the_requests_total_wait(
        emulator, make_client, sleeps):
    emulator.fail_next(429, reset_in_ms=TWO_HOURS_MS, times=None)
    policy = RetryPolicy(max_attempts=4, backoff_max=60.0, sleep=sleeps)
    with capture_logs() as logs, pytest.raises(Exception, match="still failing after 4 attempts"):
        await pull(make_client(retry=policy))

    # At most one budget wait per attempt and one retry wait between attempts, each capped.
    assert len(sleeps.waits) <= 2 * policy.max_attempts - 1
    assert sum(sleeps.waits) <= (2 * policy.max_attempts - 1) * policy.backoff_max
    # The same implausible reset is reported once, not at every wait.
    assert len([e for e in logs if e["event"] == "request_reset_implausible"]) == 1


async def test_a_reset_in_the_past_backs_off_instead_of_retrying_at_once(emulator, make_client, sleeps):
    emulator.fail_next(429, reset_in_ms=-60_000, times=3)
    policy = RetryPolicy(max_attempts=6, backoff_base=1.0, backoff_max=60.0, sleep=sleeps)
    await pull(make_client(retry=policy))
    assert len(sleeps.waits) == 3
    assert sum(sleeps.waits) > 0  # full jitter may draw a short wait, not three of zero
    assert all(0 <= wait <= 8 for wait in sleeps.waits)


def test_a_reset_is_read_in_milliseconds_seconds_or_as_seconds_from_now():
    now = 1_774_529_960.0
    assert seconds_until_reset("1774529969637", now=now) == pytest.approx(9.637)
    assert seconds_until_reset("1774529969", now=now) == pytest.approx(9.0)
    assert seconds_until_reset("30", now=now) == 30.0
    # In the past, zero, or unreadable: no hint at all.
    for value in ("1774529000000", "1774529000", "0", "soon", "-5", "", None, "\u00b2", "\u0663\u0660"):
        assert seconds_until_reset(value, now=now) is None


def test_a_429_whose_reset_is_past_or_in_seconds_gives_a_hint_only_when_ahead():
    now = time.time()
    assert server_wait_hint(429, {"X-Request-Reset": str(int(now) + 5)}, now=now) == pytest.approx(5, abs=1)
    assert server_wait_hint(429, {"X-Request-Reset": str(int((now - 5) * 1000))}, now=now) is None
    past = "Thu, 01 Jan 2015 00:00:00 GMT"
    assert server_wait_hint(503, {"Retry-After": past}, now=now) is None


async def test_budget_headers_in_digits_other_than_ascii_are_ignored():
    budget = RequestBudget(max_wait=5, sleep=SleepLog())
    budget.note({"X-Request-Remaining": "\u00b2", "X-Request-Reset": "\u00b2"})
    budget.note({"X-Request-Remaining": "-\u00b2", "X-Request-Reset": "1"})
    await budget.spend()


async def test_parallel_requests_on_a_spent_budget_each_wait_once_for_the_same_turn():
    sleeps = SleepLog()
    budget = RequestBudget(reserve=2, max_wait=5.0, sleep=sleeps)
    budget.note(spent(str(int((time.time() + 3) * 1000))))
    for _ in range(4):
        await budget.spend()
    assert len(sleeps.waits) == 4 and all(2.5 < wait <= 3.0 for wait in sleeps.waits)
    # A fresh budget from the server ends the wait.
    budget.note(spent(str(int((time.time() + 30) * 1000)), remaining=2000))
    await budget.spend()
    assert len(sleeps.waits) == 4


async def test_the_budget_never_waits_in_a_loop_and_logs_one_line_per_wait():
    sleeps = SleepLog()
    budget = RequestBudget(reserve=2, max_wait=0.5, sleep=sleeps)
    with capture_logs() as logs:
        budget.note(spent(str(int((time.time() + 3600) * 1000))))
        await budget.spend()
    [wait] = sleeps.waits
    assert 0.4 < wait <= 0.5
    assert [e["event"] for e in logs] == ["request_reset_implausible", "request_budget_wait"]


def test_a_budget_without_a_positive_cap_is_refused():
    with pytest.raises(ValueError, match="max_wait"):
        RequestBudget(max_wait=0)
