"""`mailgun-sync webhook-test` against a real daemon, and the webhook benchmark at a small N (its
figures come from the command, not from tests)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import orjson
import pytest

from tests.support.account import DOMAIN
from tests.support.daemon_process import start_daemon, stop
from tests.support.mirror import rows
from tests.support.webhooks import SIGNING_KEY, deliver, event
from worker.records import SYNCED_LISTS, SuppressionList
from worker.webhooks.selftest import TEST_RECIPIENT


async def first_runs_finished(pool) -> None:
    """The daemon's first pull of a list removes a mirror row Mailgun does not hold, so a test that
    writes such rows through webhooks waits for those pulls first."""
    for _ in range(300):
        finished = await pool.fetchval(
            "SELECT count(DISTINCT list) FROM mailgun.sync_runs WHERE domain = $1", DOMAIN)
        if finished == len(SYNCED_LISTS):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the daemon's first runs did not finish")


@pytest.mark.slow
async def test_webhook_test_passes_against_a_daemon_with_the_same_key_and_fails_with_another(
        emulator, pool, database_url, invoke):
    daemon, base = await start_daemon(emulator, database_url, MAILGUN_WEBHOOK_SIGNING_KEY=SIGNING_KEY)
    try:
        await first_runs_finished(pool)
        url = f"{base}/webhooks/mailgun"
        good = await invoke("webhook-test", "--url", url, "--signing-key", SIGNING_KEY, env={
            "MAILGUN_DOMAINS": DOMAIN})
        wrong = await invoke("webhook-test", "--url", url, "--domain", DOMAIN, env={
            "MAILGUN_WEBHOOK_SIGNING_KEY": "not-the-key"})
    finally:
        assert await stop(daemon) == 0

    assert good.code == 0, good.out
    assert "all answers as expected" in good.out
    assert good.out.count("ok  ") == 6
    for kind in SYNCED_LISTS:
        expected = [] if kind is SuppressionList.ALLOWLIST else [TEST_RECIPIENT]
        assert list(await rows(pool, kind)) == expected
    assert wrong.code == 1
    assert "FAIL permanent failure -> bounces" in wrong.out
    assert "expected 200, got 401" in wrong.out


@pytest.mark.slow
async def test_webhook_test_fails_against_a_daemon_without_a_signing_key(emulator, database_url, invoke):
    daemon, base = await start_daemon(emulator, database_url)
    try:
        outcome = await invoke("webhook-test", "--url", f"{base}/webhooks/mailgun", "--domain", DOMAIN,
                               "--signing-key", SIGNING_KEY, env={})
    finally:
        await stop(daemon)
    assert outcome.code == 1
    assert "got 503: webhooks are not configured" in outcome.out


async def test_webhook_test_needs_a_signing_key_and_a_domain(invoke):
    no_key = await invoke("webhook-test", "--url", "http://127.0.0.1:9/webhooks/mailgun", env={})
    assert (no_key.code, "MAILGUN_WEBHOOK_SIGNING_KEY" in no_key.err) == (2, True)
    no_domain = await invoke("webhook-test", "--url", "http://127.0.0.1:9/x", "--signing-key", "k", env={})
    assert (no_domain.code, "--domain" in no_domain.err) == (2, True)


@pytest.mark.slow
async def test_webhooks_in_flight_at_sigterm_are_answered_only_once_stored(emulator, pool, database_url):
    daemon, base = await start_daemon(emulator, database_url, MAILGUN_WEBHOOK_SIGNING_KEY=SIGNING_KEY)
    deliveries = [event("complained", f"late{i:04}@example.com", DOMAIN) for i in range(400)]

    async def send(session: aiohttp.ClientSession, payload: dict) -> int:
        try:
            return (await deliver(session, payload, url=base))[0]
        except aiohttp.ClientError:
            return 0  # refused once the daemon stopped listening: Mailgun would retry

    async with aiohttp.ClientSession() as session:
        sending = [asyncio.create_task(send(session, d)) for d in deliveries]
        # Stopped once the first answer is back, with the rest still arriving or in flight.
        await asyncio.wait(sending, return_when=asyncio.FIRST_COMPLETED)
        assert await stop(daemon) == 0
        answers = await asyncio.gather(*sending)

    stored = {d["event-data"]["recipient"] for d, status in zip(deliveries, answers, strict=True)
              if status == 200}
    assert stored
    assert stored <= set(await rows(pool, SuppressionList.COMPLAINTS))


@pytest.mark.slow
def test_bench_webhooks_reports_rate_latency_and_rows_alone_beside_slow_runs_and_in_a_flood_as_json():
    done = subprocess.run(
        [sys.executable, "-m", "worker", "--log-level", "WARNING", "bench-webhooks", "--events", "300",
         "--rate", "300", "--slow-runs", "4", "--page-delay", "2", "--flood", "100", "--json"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["ok"] is True
    assert (report["events"], report["rows"]) == (300, 900)
    for phase in (report, report["slow_runs"], report["flood"]):
        assert phase["answers"] == {"200": 300}
        assert phase["achieved_per_s"] > 0
        assert phase["latency_ms"]["p99"] >= phase["latency_ms"]["p50"] > 0
        assert phase["readyz_ms"] > 0
        assert phase["daemon"]["exit_code"] == 0
    assert (report["slow_runs"]["runs"], report["slow_runs"]["pulling_at_once"]) == (4, 4)
    flood = report["flood"]["flood"]
    assert flood["answered"] > 0 and set(flood["answers"]) <= {"401", "skipped"}
