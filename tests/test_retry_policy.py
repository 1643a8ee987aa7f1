"""Retries: 429, 5xx, resets and timeouts are tried again, waiting as the server asks, else with
jittered backoff; other 4xx are final."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from tests.support.account import DOMAIN
from worker import errors
from worker.emulator import Fault
from worker.mailgun.retry import RetryPolicy, server_wait_hint
from worker.records import SuppressionList

BOUNCES = SuppressionList.BOUNCES


async def pull(client) -> list:
    return [record async for record in client.records(DOMAIN, BOUNCES)]


async def test_retry_after_in_seconds_is_honoured(emulator, client, sleeps):
    emulator.fail_next(429, retry_after="3")
    await pull(client)
    assert sleeps.waits == [3.0]


async def test_retry_after_as_an_http_date_is_honoured(emulator, client, sleeps):
    when = datetime.now(UTC) + timedelta(seconds=4)
    emulator.fail_next(503, retry_after=format_datetime(when, usegmt=True))
    await pull(client)
    [wait] = sleeps.waits
    assert 2.0 < wait <= 4.0


async def test_a_429_without_retry_after_waits_for_the_budget_reset(emulator, client, sleeps):
    emulator.fail_next(429, reset_in_ms=2500)
    await pull(client)
    # The retry's wait; the request budget, told the same reset time, may also hold the next
    # request (these waits are recorded, not slept, so the clock does not move in between).
    wait = sleeps.waits[0]
    assert 1.5 < wait <= 2.5


async def test_server_waits_are_capped_at_backoff_max(emulator, make_client, sleeps):
    emulator.fail_next(429, retry_after="3600")
    await pull(make_client(retry=RetryPolicy(max_attempts=3, backoff_max=2.0, sleep=sleeps)))
    assert sleeps.waits == [2.0]


@pytest.mark.parametrize("retry_after", ["\u00b2", "\u0663", "-3", "3.5s"])
async def test_a_retry_after_that_is_not_a_number_is_ignored_not_a_crash(
        emulator, client, sleeps, retry_after):
    emulator.seed(DOMAIN, BOUNCES, [{"address": "a@example.com"}])
    emulator.fail_next(429, retry_after=retry_after)  # `²` is a digit to str.isdigit(), not to float()
    assert [r.address for r in await pull(client)] == ["a@example.com"]
    assert len(sleeps.waits) == 1


async def test_without_a_hint_backoff_is_exponential_with_full_jitter(emulator, make_client, sleeps):
    emulator.fail_next(502, times=5)
    policy = RetryPolicy(max_attempts=6, backoff_base=1.0, backoff_max=60.0, sleep=sleeps)
    await pull(make_client(retry=policy))
    assert len(sleeps.waits) == 5
    for attempt, wait in enumerate(sleeps.waits, start=1):
        assert 0 <= wait <= 2 ** attempt


async def test_giving_up_after_max_attempts_is_an_unavailable_error(emulator, client):
    emulator.fail_next(503, times=None)
    with pytest.raises(errors.MailgunUnavailableError, match="after 4 attempts: HTTP 503") as caught:
        await pull(client)
    assert caught.value.status == 503
    assert len(emulator.requests) == 4


async def test_a_dropped_connection_is_retried(emulator, client, sleeps):
    emulator.inject(Fault(action="drop", times=2))
    assert await pull(client) == []
    assert len(sleeps.waits) >= 1


async def test_a_timeout_is_retried(emulator, make_client, sleeps):
    emulator.inject(Fault(action="delay", delay_s=1.0))
    assert await pull(make_client(timeout=0.2)) == []
    assert len(sleeps.waits) == 1


async def test_a_slow_body_that_outlasts_the_timeout_is_retried(emulator, make_client, sleeps):
    emulator.seed(DOMAIN, "bounces", [{"address": f"s{i}@example.com"} for i in range(40)])
    emulator.inject(Fault(action="slow_body", delay_s=0.25))  # about 4 s for the whole page
    assert len(await pull(make_client(timeout=1.0))) == 40
    assert sleeps.waits  # the slow attempt timed out and was tried again
    assert len([r for r in emulator.requests if r.query.get("page") is None]) >= 2


async def test_other_4xx_are_final_and_carry_mailguns_message(emulator, client):
    emulator.fail_next(400, message="Invalid parameter: limit x")
    with pytest.raises(errors.MailgunRejectedError) as caught:
        await pull(client)
    assert caught.value.mailgun_message == "Invalid parameter: limit x"
    assert len(emulator.requests) == 1


def test_wait_hint_reads_seconds_dates_and_the_budget_reset():
    now = time.time()
    assert server_wait_hint(503, {"Retry-After": "7"}, now=now) == 7.0
    date = format_datetime(datetime.fromtimestamp(now + 10, UTC), usegmt=True)
    hint = server_wait_hint(503, {"Retry-After": date}, now=now)
    assert hint is not None and 8.9 < hint <= 10
    assert server_wait_hint(429, {"X-Request-Reset": str(int((now + 5) * 1000))}, now=now) == \
        pytest.approx(5, abs=0.01)
    # The budget header rides on every response; only a 429 makes it a reason to wait.
    assert server_wait_hint(500, {"X-Request-Reset": str(int((now + 5) * 1000))}, now=now) is None
    assert server_wait_hint(429, {"Retry-After": "soon"}, now=now) is None
