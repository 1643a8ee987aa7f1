"""The daemon: scheduling, /healthz, /readyz, /metrics, and a drain on stop that loses nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from structlog.testing import capture_logs

from tests.support.account import API_KEY, DOMAIN
from tests.support.mirror import insert_row, rows
from worker.daemon import Daemon, build_trigger, fixed_plans
from worker.domains import DomainPlan
from worker.emulator import Fault
from worker.errors import ConfigError, DatabaseError
from worker.lifespan import Resources
from worker.metrics import Metrics
from worker.records import SYNCED_LISTS, ListRef, SuppressionList
from worker.runs import RunCounts, RunStatus
from worker.serving import build_http_app
from worker.settings import Settings
from worker.store import MirrorStore

BOUNCES = SuppressionList.BOUNCES


def daemon_settings(emulator, **changes) -> Settings:
    options = {"api_key": API_KEY, "api_base": str(emulator.base_url), "domains": (DOMAIN,),
               "sync_interval": 1.0, "sync_jitter": 0.0, **changes}
    return Settings(**options)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def daemon(emulator, pool, store, client, metrics) -> AsyncIterator[Daemon]:
    running = Daemon(daemon_settings(emulator), Resources(pool=pool, store=store, mailgun=client),
                     metrics, fixed_plans([DomainPlan(DOMAIN, client.api_base)]))
    yield running
    await running.drain(grace=5)


async def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


def test_interval_schedule_with_jitter(emulator):
    trigger = build_trigger(daemon_settings(emulator, sync_interval=600, sync_jitter=20))
    assert isinstance(trigger, IntervalTrigger)
    assert (trigger.interval.total_seconds(), trigger.jitter) == (600, 20)


def test_cron_schedule_counts_weekdays_from_sunday_like_crontab(emulator):
    trigger = build_trigger(daemon_settings(emulator, sync_cron="*/15 2 * * 1-5"))
    assert isinstance(trigger, CronTrigger)
    assert str(trigger.fields[4]) == "mon,tue,wed,thu,fri"  # day_of_week
    assert str(trigger.fields[6]) == "0,15,30,45"  # minute


@pytest.mark.parametrize("cron", ["* * *", "61 * * * *", "* * * * funday"])
def test_a_malformed_cron_names_sync_cron(emulator, cron):
    with pytest.raises(ConfigError) as caught:
        build_trigger(daemon_settings(emulator, sync_cron=cron))
    assert caught.value.setting == "SYNC_CRON"


async def test_every_list_is_reconciled_on_schedule_again_and_again(daemon, emulator, pool):
    emulator.seed(DOMAIN, BOUNCES, [{"address": "sched@example.com"}])
    await daemon.start()

    async def every_list_ran_twice() -> bool:
        counts = await pool.fetch("SELECT list, count(*) AS n FROM mailgun.sync_runs GROUP BY list")
        return len(counts) == len(SYNCED_LISTS) and all(r["n"] >= 2 for r in counts)

    await wait_for(every_list_ran_twice)
    assert "sched@example.com" in await rows(pool, BOUNCES)


async def test_health_readiness_and_metrics_endpoints(daemon, emulator, metrics, aiohttp_client):
    http = await aiohttp_client(build_http_app(daemon, metrics))
    assert (await http.get("/healthz")).status == 200
    starting = await http.get("/readyz")
    assert starting.status == 503 and "starting" in await starting.text()
    before = await (await http.get("/metrics")).text()
    assert 'mailgun_sync_runs_total{domain="mg.example.com"' not in before

    emulator.seed(DOMAIN, BOUNCES, [{"address": f"m{i}@example.com"} for i in range(7)])
    await daemon.start()
    assert (await http.get("/readyz")).status == 200

    async def metrics_show_a_run() -> bool:
        text = await (await http.get("/metrics")).text()
        inserted = 'mailgun_sync_records_total{action="inserted",domain="mg.example.com",list="bounces"}'
        return f"{inserted} 7.0" in text

    await wait_for(metrics_show_a_run)
    text = await (await http.get("/metrics")).text()
    assert 'mailgun_sync_runs_total{domain="mg.example.com",list="bounces",status="ok"}' in text
    assert 'mailgun_sync_last_success_timestamp_seconds{domain="mg.example.com",list="bounces"}' in text
    assert 'mailgun_sync_pending_rows{domain="mg.example.com",list="bounces"} 0.0' in text
    assert 'mailgun_sync_run_duration_seconds_count{domain="mg.example.com",list="bounces"}' in text


@pytest.mark.slow
async def test_a_list_that_keeps_failing_leaves_the_daemon_ready_and_shows_in_the_metrics(
        emulator, pool, store, make_client, metrics, aiohttp_client):
    from worker.mailgun.retry import RetryPolicy

    client = make_client(retry=RetryPolicy(max_attempts=1), observer=metrics)
    daemon = Daemon(daemon_settings(emulator), Resources(pool=pool, store=store, mailgun=client),
                    metrics, fixed_plans([DomainPlan(DOMAIN, client.api_base, (BOUNCES,))]))
    http = await aiohttp_client(build_http_app(daemon, metrics))
    emulator.fail_next(503, times=None, list="bounces")
    await daemon.start()
    try:
        async def failed_three_times() -> bool:
            return (failures(metrics) or 0) >= 3

        await wait_for(failed_three_times)
        # Readiness is about this process: the webhooks of every domain still reach it.
        assert (await http.get("/readyz")).status == 200
        text = await (await http.get("/metrics")).text()
        assert 'mailgun_sync_http_requests_total{method="GET",status="503"}' in text
        assert 'mailgun_sync_runs_total{domain="mg.example.com",list="bounces",status="failed"}' in text
        emulator.faults.clear()

        async def recovered() -> bool:
            return failures(metrics) == 0

        await wait_for(recovered)
    finally:
        await daemon.drain(grace=5)


def failures(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("mailgun_sync_consecutive_failures",
                                             {"domain": DOMAIN, "list": "bounces"})


async def test_readiness_fails_when_the_database_is_unreachable(daemon, metrics, pool, aiohttp_client):
    http = await aiohttp_client(build_http_app(daemon, metrics))
    await daemon.start()
    await pool.close()
    response = await http.get("/readyz")
    assert response.status == 503
    assert "database unreachable" in await response.text()


async def test_the_last_success_is_known_from_the_run_log_before_this_process_succeeds(
        emulator, pool, store, make_client, metrics):
    from datetime import UTC, datetime, timedelta
    from uuid import uuid4

    from worker.mailgun.retry import RetryPolicy

    earlier = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    await store.record_run(uuid4(), DOMAIN, BOUNCES, status=RunStatus.OK, dry_run=False, counts=RunCounts(),
                           error=None, started=earlier - timedelta(seconds=5), finished=earlier)
    emulator.fail_next(503, times=None, list="bounces")
    client = make_client(retry=RetryPolicy(max_attempts=1))
    daemon = Daemon(daemon_settings(emulator), Resources(pool=pool, store=store, mailgun=client),
                    metrics, fixed_plans([DomainPlan(DOMAIN, client.api_base, (BOUNCES,))]))
    await daemon.start()
    try:
        assert metrics.registry.get_sample_value(
            "mailgun_sync_last_success_timestamp_seconds",
            {"domain": DOMAIN, "list": "bounces"}) == earlier.timestamp()
    finally:
        await daemon.drain(grace=5)


def last_success(metrics: Metrics, domain: str) -> float | None:
    return metrics.registry.get_sample_value(
        "mailgun_sync_last_success_timestamp_seconds", {"domain": domain, "list": "bounces"})


async def test_a_list_no_longer_synced_gets_no_last_success_gauge_at_start(emulator, pool, store, client):
    long_ago = datetime.now(UTC).replace(microsecond=0) - timedelta(days=30)
    await store.record_run(uuid.uuid4(), "mg.retired.example.com", BOUNCES, status=RunStatus.OK,
                           dry_run=False, counts=RunCounts(), error=None, started=long_ago, finished=long_ago)
    metrics = Metrics()
    daemon = Daemon(daemon_settings(emulator, sync_interval=3600),
                    Resources(pool=pool, store=store, mailgun=client),
                    metrics, fixed_plans([DomainPlan(DOMAIN, client.api_base, (BOUNCES,))]))
    await daemon.start()
    try:
        # An alert on this gauge's age would fire for a domain the daemon does not sync.
        assert last_success(metrics, "mg.retired.example.com") is None
    finally:
        await daemon.drain(grace=5)


async def test_the_daemon_warns_at_its_start_and_each_refresh_of_pending_rows_of_a_domain_it_does_not_sync(
        emulator, pool, store, client):
    await insert_row(pool, BOUNCES, "mg.misspelt.example.com", "a@example.com")
    daemon = Daemon(daemon_settings(emulator, sync_interval=3600),
                    Resources(pool=pool, store=store, mailgun=client),
                    Metrics(), fixed_plans([DomainPlan(DOMAIN, client.api_base, (BOUNCES,))]))
    with capture_logs() as logs:
        await daemon.start()
        try:
            await daemon.refresh_domains()
        finally:
            await daemon.drain(grace=5)

    warned = [line for line in logs if line["event"] == "pending_rows_of_unsynced_domain"]
    assert [(line["domain"], line["rows"], line["lists"]) for line in warned] == [
        ("mg.misspelt.example.com", 1, {"bounces": 1})] * 2


async def test_a_list_scheduled_by_a_refresh_gets_its_last_success_and_one_unscheduled_loses_it(
        emulator, pool, store, make_client, metrics):
    from worker.domains import Planned
    from worker.mailgun.retry import RetryPolicy

    other = "mg.other.example.com"
    earlier = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    for domain in (DOMAIN, other):
        await store.record_run(uuid.uuid4(), domain, BOUNCES, status=RunStatus.OK, dry_run=False,
                               counts=RunCounts(), error=None, started=earlier, finished=earlier)
    emulator.fail_next(503, times=None, list="bounces")  # no run succeeds: the gauge is the log's
    client = make_client(retry=RetryPolicy(max_attempts=1))
    planned = [DomainPlan(DOMAIN, client.api_base, (BOUNCES,))]

    async def planner() -> Planned:
        return Planned(list(planned), [])

    daemon = Daemon(daemon_settings(emulator, sync_interval=3600),
                    Resources(pool=pool, store=store, mailgun=client), metrics, planner)
    await daemon.start()
    try:
        assert (last_success(metrics, DOMAIN), last_success(metrics, other)) == (earlier.timestamp(), None)
        planned[:] = [DomainPlan(other, client.api_base, (BOUNCES,))]
        await daemon.refresh_domains()
        assert (last_success(metrics, DOMAIN), last_success(metrics, other)) == (None, earlier.timestamp())
    finally:
        await daemon.drain(grace=5)


@pytest.mark.slow
async def test_a_run_longer_than_the_interval_keeps_its_list_and_the_next_follows_when_it_ends(
        emulator, pool, store, client, metrics):
    # Its claim is renewed while it runs, so the list is not claimed again meanwhile (by this
    # replica or another); the runs it outlasted are one run, started as soon as it ends.
    emulator.inject(Fault(action="delay", delay_s=2.5, times=1, list="bounces"))
    daemon = Daemon(daemon_settings(emulator), Resources(pool=pool, store=store, mailgun=client),
                    metrics, fixed_plans([DomainPlan(DOMAIN, client.api_base, (BOUNCES,))]))
    await daemon.start()
    try:
        async def two_runs() -> bool:
            return await pool.fetchval("SELECT count(*) FROM mailgun.sync_runs") >= 2

        await wait_for(two_runs)
    finally:
        await daemon.drain(grace=5)
    first, second = await pool.fetch(
        "SELECT started_at, finished_at FROM mailgun.sync_runs ORDER BY started_at LIMIT 2")
    assert (first["finished_at"] - first["started_at"]).total_seconds() >= 2.5
    assert 0 <= (second["started_at"] - first["finished_at"]).total_seconds() <= 1.5
    assert metrics.registry.get_sample_value(
        "mailgun_sync_runs_skipped_total",
        {"domain": DOMAIN, "list": "bounces", "reason": "still_running"}) is None


class PendingCountFails(MirrorStore):
    """The mirror, but counting a list's pending rows fails as a lost connection would."""

    async def count_states(self, ref: ListRef) -> tuple[int, int]:
        raise DatabaseError("PostgreSQL could not be reached while counting: connection lost")


async def test_a_failure_to_count_pending_rows_after_an_ok_run_is_not_a_failed_run(
        emulator, pool, client, metrics):
    daemon = Daemon(daemon_settings(emulator, sync_interval=3600),
                    Resources(pool=pool, store=PendingCountFails(pool), mailgun=client),
                    metrics, fixed_plans([DomainPlan(DOMAIN, client.api_base, (BOUNCES,))]))
    await daemon.start()
    try:
        async def ran() -> bool:
            return metrics.registry.get_sample_value(
                "mailgun_sync_runs_total", {"domain": DOMAIN, "list": "bounces", "status": "ok"}) == 1

        await wait_for(ran)
        assert failures(metrics) == 0
    finally:
        await daemon.drain(grace=5)


def daemon_env(emulator, database_url, **extra) -> dict[str, str]:
    return {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
            "MAILGUN_DOMAINS": DOMAIN, "DATABASE_URL": database_url, "HTTP_PORT": "0",
            "SYNC_JITTER": "0", **extra}


async def sigterm_mid_push(emulator, pool, database_url, *, rows_pending: int, push_delay: float,
                           grace: str) -> int:
    """Start a daemon with `rows_pending` local additions, each push held `push_delay` seconds,
    send SIGTERM once a push is under way, and return its exit code."""
    await pool.executemany("INSERT INTO mailgun.bounces (domain, address) VALUES ($1, $2)",
                           [(DOMAIN, f"drain{i:04}@example.com") for i in range(rows_pending)])
    emulator.inject(Fault(action="delay", delay_s=push_delay, times=None, method="POST"))
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "daemon", "--list", "bounces",
        env=daemon_env(emulator, database_url, SHUTDOWN_GRACE=grace),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    await wait_for(lambda: _posted(emulator))
    worker.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(worker.wait(), 30)


@pytest.mark.slow
async def test_sigterm_lets_the_run_in_progress_finish_then_exits_0(emulator, pool, database_url):
    code = await sigterm_mid_push(emulator, pool, database_url, rows_pending=1500, push_delay=1.0,
                                  grace="20")

    assert code == 0
    mirror = await rows(pool, BOUNCES)
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}
    assert len(emulator.records(DOMAIN, BOUNCES)) == 1500
    assert await pool.fetchval("SELECT status FROM mailgun.sync_runs") == "ok"


@pytest.mark.slow
async def test_sigterm_past_the_grace_cancels_cleanly_and_keeps_rows_pending(emulator, pool, database_url):
    code = await sigterm_mid_push(emulator, pool, database_url, rows_pending=10, push_delay=30,
                                  grace="0.5")

    assert code == 0
    mirror = await rows(pool, BOUNCES)
    assert {r["sync_state"] for r in mirror.values()} == {"pending"}
    run = await pool.fetchrow("SELECT status, error FROM mailgun.sync_runs")
    assert run["status"] == "failed"
    assert "interrupted" in run["error"]


@pytest.mark.slow
async def test_a_run_cancelled_by_a_stop_is_one_json_line_and_stderr_stays_json_lines(
        emulator, pool, database_url, tmp_path):
    """SIGTERM during a slow pull with SHUTDOWN_GRACE=1: the cancelled run is one structured line
    (its list_reconciled, failed, at warning), and every line the process wrote to stderr, from
    start to exit, is a JSON object: no scheduler traceback between them."""
    emulator.inject(Fault(action="hold", list="bounces", times=None))
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as sink:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "daemon",
            env=daemon_env(emulator, database_url, SHUTDOWN_GRACE="1", WEBHOOK_PORT="0"),
            stdout=asyncio.subprocess.DEVNULL, stderr=sink)
    try:
        async with asyncio.timeout(30):
            await emulator.until_held()
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    finally:
        emulator.release()
        if worker.returncode is None:
            worker.kill()
            await worker.wait()

    lines = stderr.read_text().splitlines()
    logs = [json.loads(line) for line in lines]  # each one a JSON object, or this fails
    assert all(isinstance(entry, dict) for entry in logs)
    cancelled = [e for e in logs if e.get("list") == "bounces" and e["event"] == "list_reconciled"]
    assert len(cancelled) == 1
    assert (cancelled[0]["status"], cancelled[0]["level"]) == ("failed", "warning")
    assert "interrupted" in cancelled[0]["error"]
    assert not any("CancelledError" in line or "Traceback" in line for line in lines)
    assert [e["event"] for e in logs][-1] == "daemon_stopped"
    # The start names the ports as bound (0 asks for any free one).
    [started] = [e for e in logs if e["event"] == "daemon_started"]
    assert started["http_port"] > 0 and started["webhook_port"] > 0
    assert started["http_port"] != started["webhook_port"]


async def _posted(emulator) -> bool:
    return any(r.method == "POST" for r in emulator.requests)


async def test_every_replica_shows_each_lists_failures_pending_rows_and_last_success_as_the_mirror_has_them(
        emulator, pool, store, client, metrics):
    # The lists' runs are shared among replicas: a replica's gauges for a list another replica
    # runs are read from the mirror, so an alert on any replica's series says what happened.
    daemon = Daemon(daemon_settings(emulator, sync_interval=3600),
                    Resources(pool=pool, store=store, mailgun=client), metrics,
                    fixed_plans([DomainPlan(DOMAIN, client.api_base, (BOUNCES,))]))
    await daemon.start()
    try:
        async def its_own_first_run() -> bool:
            return bool(await pool.fetchval("SELECT count(*) FROM mailgun.sync_runs"))

        await wait_for(its_own_first_run)
        at = datetime.now(UTC)
        for _ in range(3):  # another replica's runs, failing
            await store.record_run(uuid.uuid4(), DOMAIN, BOUNCES, status=RunStatus.FAILED, dry_run=False,
                                   counts=RunCounts(), error="Mailgun answered 500", started=at, finished=at)
        await insert_row(pool, BOUNCES, DOMAIN, "waiting@example.com")
        await daemon.refresh_gauges()
        failing = (gauge(metrics, "mailgun_sync_consecutive_failures"),
                   gauge(metrics, "mailgun_sync_pending_rows"))
        ok_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
        await store.record_run(uuid.uuid4(), DOMAIN, BOUNCES, status=RunStatus.OK, dry_run=False,
                               counts=RunCounts(), error=None, started=ok_at, finished=ok_at)
        await daemon.refresh_gauges()
        recovered = (gauge(metrics, "mailgun_sync_consecutive_failures"), last_success(metrics, DOMAIN))
    finally:
        await daemon.drain(grace=5)
    assert failing == (3, 1)
    assert recovered == (0, ok_at.timestamp())


def gauge(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"domain": DOMAIN, "list": "bounces"})
