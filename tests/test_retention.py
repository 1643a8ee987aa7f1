"""Retention: the change log and run records older than SYNC_RETENTION_DAYS are pruned in small
batches, never a list's latest run, one process at a time, while webhooks and runs keep writing;
from the daemon every hour and from `mailgun-sync prune`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler.triggers.interval import IntervalTrigger

from tests.support.account import API_KEY, DOMAIN
from tests.support.webhooks import deliver, event
from worker.daemon import PRUNE_INTERVAL, Daemon, fixed_plans
from worker.domains import DomainPlan
from worker.lifespan import Resources
from worker.metrics import Metrics
from worker.records import SuppressionList
from worker.retention import BATCH_ROWS, prune
from worker.runs import RunCounts, RunStatus
from worker.settings import Settings
from worker.store import MirrorStore

BOUNCES = SuppressionList.BOUNCES


async def add_changes(pool, count: int, *, days_old: float, domain: str = DOMAIN) -> None:
    """`count` change rows written `days_old` days ago, and up to `count` seconds before."""
    await pool.execute(
        """INSERT INTO mailgun.changes (run_id, domain, list, address, action, at)
           SELECT gen_random_uuid(), $1, 'bounces', format('old%s@example.com', i), 'insert',
                  now() - $3::float8 * interval '1 day' - i * interval '1 second'
           FROM generate_series(1, $2) AS i""", domain, count, days_old)


async def add_run(pool, *, days_old: float, status: str = "ok", domain: str = DOMAIN,
                  kind: str = "bounces") -> int:
    """A run recorded as the worker records one, finished `days_old` days ago; its row's id."""
    run_id = uuid.uuid4()
    at = await pool.fetchval("SELECT now() - $1::float8 * interval '1 day'", days_old)
    await MirrorStore(pool).record_run(run_id, domain, SuppressionList(kind), status=RunStatus(status),
                                       dry_run=False, counts=RunCounts(), error=None, started=at,
                                       finished=at)
    row_id: int = await pool.fetchval("SELECT id FROM mailgun.sync_runs WHERE run_id = $1", run_id)
    return row_id


async def change_ages(pool) -> list[int]:
    """Each change row's age in whole days, oldest first."""
    found = await pool.fetch(
        "SELECT extract(day FROM now() - at)::int AS days FROM mailgun.changes ORDER BY at")
    return [r["days"] for r in found]


async def run_ids(pool) -> set[int]:
    return {r["id"] for r in await pool.fetch("SELECT id FROM mailgun.sync_runs")}


async def test_pruning_removes_only_rows_older_than_the_retention(pool):
    await add_changes(pool, 5, days_old=31)
    await add_changes(pool, 3, days_old=29)
    superseded = await add_run(pool, days_old=40)
    await add_run(pool, days_old=31)
    recent = await add_run(pool, days_old=29)

    report = await prune(pool, 30)

    assert await change_ages(pool) == [29, 29, 29]
    assert await run_ids(pool) == {recent}
    assert superseded not in await run_ids(pool)
    assert {(t.table, t.rows) for t in report.tables} == {("changes", 5), ("sync_runs", 2), ("removals", 0)}
    assert report.rows == 7 and not report.skipped


@pytest.mark.parametrize("batch_rows", [BATCH_ROWS, 2])
async def test_the_latest_run_of_each_list_and_status_is_kept_whatever_its_age(
        pool, invoke, database_url, batch_rows):
    await add_run(pool, days_old=100, status="ok")
    last_ok = await add_run(pool, days_old=90, status="ok")
    last_failed = await add_run(pool, days_old=45, status="failed")
    await add_run(pool, days_old=95, status="ok", kind="complaints")
    only_complaints = await add_run(pool, days_old=70, status="ok", kind="complaints")
    other_domain = await add_run(pool, days_old=60, status="guarded", domain="mg.other.example")
    await add_run(pool, days_old=50, status="failed")

    await prune(pool, 30, batch_rows=batch_rows)

    assert await run_ids(pool) == {last_ok, last_failed, only_complaints, other_domain}
    shown = await invoke("status", "--json", env={"DATABASE_URL": database_url})
    assert shown.lists()[(DOMAIN, "bounces")]["status"] == "failed"
    assert shown.lists()[(DOMAIN, "complaints")]["status"] == "ok"


async def test_a_table_larger_than_one_batch_is_pruned_completely_batch_by_batch(pool):
    await add_changes(pool, 1_050, days_old=45)
    await add_changes(pool, 20, days_old=1)
    for days in range(60, 35, -1):
        await add_run(pool, days_old=days)

    report = await prune(pool, 30, batch_rows=100)

    changes, runs, _ = report.tables
    assert (changes.table, changes.rows, changes.batches) == ("changes", 1_050, 11)
    assert (runs.table, runs.rows, runs.batches) == ("sync_runs", 24, 1)
    assert await change_ages(pool) == [1] * 20
    assert len(await run_ids(pool)) == 1
    assert changes.longest_statement_s > 0


async def test_a_second_pass_finds_nothing_left(pool):
    await add_changes(pool, 250, days_old=40)
    await prune(pool, 30, batch_rows=100)

    again = await prune(pool, 30, batch_rows=100)

    assert again.rows == 0
    assert [t.batches for t in again.tables] == [1, 1, 1]


async def test_retention_zero_keeps_everything(pool):
    await add_changes(pool, 10, days_old=3650)
    await add_run(pool, days_old=3650, status="failed")
    await add_run(pool, days_old=3000, status="failed")

    report = await prune(pool, 0)

    assert (report.rows, report.tables, report.cutoff) == (0, [], None)
    assert len(await change_ages(pool)) == 10
    assert len(await run_ids(pool)) == 2


async def test_only_one_process_prunes_at_a_time_the_other_skips(pool):
    await add_changes(pool, 10, days_old=40)
    async with pool.acquire() as other:
        assert await other.fetchval("SELECT pg_try_advisory_lock(hashtext('mailgun-sync:retention'), 0)")
        try:
            report = await prune(pool, 30)
        finally:
            await other.fetchval("SELECT pg_advisory_unlock(hashtext('mailgun-sync:retention'), 0)")

    assert report.skipped and report.rows == 0
    assert len(await change_ages(pool)) == 10
    assert (await prune(pool, 30)).rows == 10



async def test_pruning_while_webhooks_and_runs_write_loses_no_new_row(
        pool, webhook_http, emulator, make_reconciler: Callable[..., Any]):
    await add_changes(pool, 6_000, days_old=40)
    for days in range(50, 40, -1):
        await add_run(pool, days_old=days)
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"remote{i}@example.com"} for i in range(50)])

    moments: dict[str, float] = {}

    async def pruning() -> Any:
        report = await prune(pool, 30, batch_rows=50)
        moments["pruned"] = time.monotonic()
        return report

    async def webhooks() -> list[int]:
        answers = []
        for i in range(120):
            status, _ = await deliver(webhook_http, event("complained", f"hook{i}@example.com", DOMAIN))
            moments.setdefault("first_webhook", time.monotonic())
            answers.append(status)
        return answers

    async def runs() -> list[str]:
        reconciler = make_reconciler()
        statuses = []
        for _ in range(4):
            emulator.seed(DOMAIN, BOUNCES, [{"address": f"later{uuid.uuid4().hex[:8]}@example.com"}])
            statuses.append((await reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)).status)
        return statuses

    report, answers, statuses = await asyncio.wait_for(
        asyncio.gather(pruning(), webhooks(), runs()), timeout=120)

    assert moments["first_webhook"] < moments["pruned"]  # they overlapped
    assert report.tables[0].rows == 6_000 and report.tables[0].batches > 100
    assert answers == [200] * 120
    assert statuses == ["ok"] * 4
    written = await pool.fetchval("SELECT count(*) FROM mailgun.changes WHERE source = 'webhook'")
    assert written == 120
    inserted = await pool.fetchval("SELECT count(*) FROM mailgun.changes WHERE action = 'insert' "
                                   "AND source = 'reconcile' AND at > now() - interval '1 hour'")
    assert inserted == 54  # 50 on the first run, one more on each
    assert set(await change_ages(pool)) == {0}
    assert await pool.fetchval("SELECT count(*) FROM mailgun.sync_runs "
                               "WHERE finished_at > now() - interval '1 hour'") == 4


def prune_settings(emulator, **changes: Any) -> Settings:
    return Settings(**{"api_key": API_KEY, "api_base": str(emulator.base_url), "domains": (DOMAIN,),
                       "sync_interval": 3600.0, "sync_jitter": 0.0, **changes})


async def test_the_daemon_prunes_soon_after_it_starts_and_then_every_hour(emulator, pool, store, client):
    await add_changes(pool, 30, days_old=10)
    await add_changes(pool, 5, days_old=1)
    metrics = Metrics()
    daemon = Daemon(prune_settings(emulator, retention_days=7),
                    Resources(pool=pool, store=store, mailgun=client), metrics,
                    fixed_plans([DomainPlan(DOMAIN, client.api_base, lists=(BOUNCES,))]))
    await daemon.start()
    try:
        deadline = time.monotonic() + 10
        # The metric is counted once the prune has been through every table.
        while 'mailgun_sync_pruned_rows_total{table="changes"} 30.0' not in metrics.exposition().decode():
            assert time.monotonic() < deadline, "the daemon did not prune"
            await asyncio.sleep(0.05)
        assert not await pool.fetchval(
            "SELECT count(*) FROM mailgun.changes WHERE at < now() - interval '7 days'")
        job = daemon._scheduler.get_job("prune-retention")
        assert isinstance(job.trigger, IntervalTrigger)
        assert job.trigger.interval.total_seconds() == PRUNE_INTERVAL == 3600
    finally:
        await daemon.drain(grace=5)
    assert len(await change_ages(pool)) >= 5


async def test_a_daemon_keeping_everything_schedules_no_pruning(emulator, pool, store, client):
    daemon = Daemon(prune_settings(emulator, retention_days=0),
                    Resources(pool=pool, store=store, mailgun=client), Metrics(),
                    fixed_plans([DomainPlan(DOMAIN, client.api_base, lists=(BOUNCES,))]))
    await daemon.start()
    try:
        assert daemon._scheduler.get_job("prune-retention") is None
        await daemon.refresh_domains()  # planning again leaves the housekeeping jobs alone
        assert daemon._scheduler.get_job("refresh-domains") is not None
    finally:
        await daemon.drain(grace=5)


async def test_planning_again_keeps_the_pruning_job(emulator, pool, store, client):
    daemon = Daemon(prune_settings(emulator, sync_jitter=3600.0),
                    Resources(pool=pool, store=store, mailgun=client), Metrics(),
                    fixed_plans([DomainPlan(DOMAIN, client.api_base, lists=(BOUNCES,))]))
    await daemon.start()
    try:
        await daemon.refresh_domains()
        assert daemon._scheduler.get_job("prune-retention") is not None
    finally:
        await daemon.drain(grace=5)


async def test_prune_command_exits_0_and_prints_what_it_removed_without_an_api_key(
        pool, invoke, database_url):
    await add_changes(pool, 12, days_old=20)
    await add_changes(pool, 3, days_old=2)
    await add_run(pool, days_old=20)
    await add_run(pool, days_old=2)
    env = {"DATABASE_URL": database_url, "SYNC_RETENTION_DAYS": "60"}

    done = await invoke("prune", "--retention-days", "14", env=env)

    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert lines[0].startswith("pruned 13 rows older than 14 days (before ")
    assert lines[1].split()[:3] == ["changes", "12", "rows"]
    assert lines[2].split()[:3] == ["sync_runs", "1", "rows"]
    assert len(await change_ages(pool)) == 3


async def test_prune_command_json_names_each_table(pool, invoke, database_url):
    await add_changes(pool, 4, days_old=40)

    done = await invoke("prune", "--json", env={"DATABASE_URL": database_url})

    assert done.code == 0, done.err
    report = done.report()
    assert (report["retention_days"], report["rows"], report["skipped"]) == (30, 4, False)
    assert [(t["table"], t["rows"]) for t in report["tables"]] == [
        ("changes", 4), ("sync_runs", 0), ("removals", 0)]


async def test_the_retention_pruned_line_gives_the_cutoff_in_iso_8601(pool, invoke, database_url):
    await add_changes(pool, 2, days_old=40)

    done = await invoke("prune", env={"DATABASE_URL": database_url})

    assert done.code == 0, done.err
    [line] = [line for line in done.logs() if line["event"] == "retention_pruned"]
    cutoff = datetime.fromisoformat(line["cutoff"])
    assert cutoff.utcoffset() is not None
    assert timedelta(days=29) < datetime.now(UTC) - cutoff < timedelta(days=31)
    assert line["changes"] == 2


async def test_prune_command_with_retention_zero_prunes_nothing_and_says_so(pool, invoke, database_url):
    await add_changes(pool, 4, days_old=400)

    done = await invoke("prune", env={"DATABASE_URL": database_url, "SYNC_RETENTION_DAYS": "0"})

    assert done.code == 0
    assert "kept; nothing pruned" in done.out
    assert len(await change_ages(pool)) == 4


@pytest.mark.parametrize(("argv", "env"), [
    ((), {"SYNC_RETENTION_DAYS": "-1"}),
    ((), {"SYNC_RETENTION_DAYS": "thirty"}),
    ((), {"SYNC_RETENTION_DAYS": "1.5"}),
    (("--retention-days", "99999"), {}),
])
async def test_a_bad_retention_is_one_line_naming_it_and_exit_2(invoke, database_url, argv, env):
    done = await invoke("prune", *argv, env={"DATABASE_URL": database_url, **env})

    assert done.code == 2
    assert done.err.startswith("mailgun-sync: SYNC_RETENTION_DAYS: ")
    assert len(done.err.splitlines()) == 1


async def test_the_daemon_refuses_a_bad_retention_before_starting(invoke, database_url):
    env = {"DATABASE_URL": database_url, "MAILGUN_API_KEY": API_KEY, "MAILGUN_DOMAINS": DOMAIN}

    done = await invoke("daemon", "--retention-days", "-3", env=env)

    assert done.code == 2
    assert done.err.startswith("mailgun-sync: SYNC_RETENTION_DAYS: ")


async def test_prune_command_without_a_database_url_names_it(invoke):
    done = await invoke("prune", env={})

    assert done.code == 2
    assert done.err.startswith("mailgun-sync: DATABASE_URL: ")


async def test_removals_carried_out_are_pruned_with_the_history_but_never_before_30_days(pool):
    async def removal(address: str, done_days_ago: int | None) -> None:
        await pool.execute(
            "INSERT INTO mailgun.removals (domain, list, address, removed_at, sent_at, done_at)"
            " VALUES ($1, 'bounces', $2, now() - make_interval(days => $3), now(),"
            " now() - make_interval(days => $4))", DOMAIN, address, (done_days_ago or 0) + 1, done_days_ago)

    await removal("old@example.com", 40)
    await removal("recent@example.com", 10)  # past a 1-day retention, but a late webhook may still come
    await removal("queued@example.com", None)  # not carried out yet

    report = await prune(pool, 1)

    assert {t.table: t.rows for t in report.tables}["removals"] == 1
    left = {r["address"] for r in await pool.fetch("SELECT address FROM mailgun.removals")}
    assert left == {"recent@example.com", "queued@example.com"}
