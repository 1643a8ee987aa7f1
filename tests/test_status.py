"""`mailgun-sync status [--json]` called in-process: per (domain, list) the last run's time, status,
counts and error, with the rows still pending or rejected; it needs no API key and prints none."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.account import API_KEY, DOMAIN
from tests.support.cli import Outcome
from tests.support.mirror import insert_row
from worker.backfill import Backfiller, Progress
from worker.mailgun.retry import RetryPolicy
from worker.reconcile import ReconcileOptions, Reconciler
from worker.records import SuppressionList
from worker.runs import RunCounts, RunStatus

SECOND_DOMAIN = "mg.second-example.org"
OTHER_LISTS_DOMAIN = "mg.lastruns.example"
BOUNCES = SuppressionList.BOUNCES
UNSUBSCRIBES = SuppressionList.UNSUBSCRIBES
COMPLAINTS = SuppressionList.COMPLAINTS
LISTS = ("bounces", "unsubscribes", "complaints", "allowlist")
COUNTS = ("pulled", "inserted", "updated", "removed", "adopted", "pushed", "rejected", "deleted", "skipped")
FIELDS = {"domain", "list", "last_run_at", "status", *COUNTS, "pending_rows", "rejected_rows", "error"}


@pytest.fixture
def status(invoke):
    async def status(*flags: str, env: dict[str, str]) -> Outcome:
        outcome: Outcome = await invoke("status", *flags, env=env)
        return outcome

    return status


@pytest.fixture
def env(emulator, database_url, pool) -> dict[str, str]:
    """What a worker's environment holds, the API key included (status must not need or show it)."""
    return {"MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
            "MAILGUN_DOMAINS": DOMAIN, "DATABASE_URL": database_url}


def never_run(domain: str, kind: str, *, pending: int = 0, rejected: int = 0) -> dict[str, Any]:
    return {"domain": domain, "list": kind, "last_run_at": None, "status": None, **dict.fromkeys(COUNTS, 0),
            "pending_rows": pending, "rejected_rows": rejected, "error": None}


async def arrange_runs(pool, emulator, store, make_client, sleeps) -> None:
    """bounces: pulled, pushed one row and rejected another; unsubscribes: the pull failed, one row
    still pending; complaints: backfilled. On a second domain, only complaints ran."""
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"bounced{i}@example.com"} for i in range(3)])
    emulator.seed(DOMAIN, COMPLAINTS, [{"address": "complained@example.com"}])
    emulator.declare(SECOND_DOMAIN)
    emulator.seed(SECOND_DOMAIN, COMPLAINTS, [{"address": f"angry{i}@example.com"} for i in range(2)])
    await insert_row(pool, BOUNCES, DOMAIN, "local.addition@example.net")
    await insert_row(pool, BOUNCES, DOMAIN, "not-an-address")
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, "optout@example.org", tags=["newsletter"])
    emulator.fail_next(503, times=None, method="GET", list="unsubscribes")
    client = make_client(retry=RetryPolicy(max_attempts=2, backoff_max=1.0, sleep=sleeps))
    reconciler = Reconciler(store, client, ReconcileOptions())
    results = await reconciler.run(uuid.uuid4(), [DOMAIN], [BOUNCES, UNSUBSCRIBES])
    assert [r.status for r in results] == ["ok", "failed"]
    backfiller = Backfiller(store, client, ReconcileOptions(), progress=Progress(io.StringIO()))
    results = await backfiller.run(uuid.uuid4(), [DOMAIN, SECOND_DOMAIN], [COMPLAINTS])
    assert [r.status for r in results] == ["ok", "ok"]


def both_domains(env: dict[str, str]) -> dict[str, str]:
    return {**env, "MAILGUN_DOMAINS": f"{DOMAIN},{SECOND_DOMAIN}"}


async def last_finished(pool, domain: str, kind: str) -> datetime:
    return await pool.fetchval(
        "SELECT max(finished_at) FROM mailgun.sync_runs WHERE domain = $1 AND list = $2", domain, kind)


async def test_status_before_any_run_lists_every_configured_list_as_never_run(pool, env, status):
    await insert_row(pool, BOUNCES, DOMAIN, "waiting@example.com")

    outcome = await status("--json", env=env)

    assert (outcome.code, outcome.err) == (0, "")
    assert outcome.lists() == {
        (DOMAIN, "bounces"): never_run(DOMAIN, "bounces", pending=1),
        (DOMAIN, "unsubscribes"): never_run(DOMAIN, "unsubscribes"),
        (DOMAIN, "complaints"): never_run(DOMAIN, "complaints"),
        (DOMAIN, "allowlist"): never_run(DOMAIN, "allowlist"),
    }
    table = (await status(env=env)).out
    for kind in LISTS:
        [line] = [line for line in table.splitlines() if f" {kind} " in line]
        assert line.startswith(DOMAIN)
        assert "never" in line


async def test_status_with_no_domain_configured_and_no_run_says_no_runs_are_recorded(pool, env, status):
    del env["MAILGUN_DOMAINS"]

    assert (await status("--json", env=env)).lists() == {}
    table = await status(env=env)
    assert (table.code, table.out) == (0, "no runs recorded yet\n")


async def test_status_json_gives_each_lists_last_run_counts_pending_and_rejected_rows_and_error(
        pool, emulator, store, make_client, sleeps, env, status):
    await arrange_runs(pool, emulator, store, make_client, sleeps)

    outcome = await status("--json", env=both_domains(env))

    assert (outcome.code, outcome.err) == (0, "")
    lists = outcome.lists()
    assert set(lists) == {(d, k) for d in (DOMAIN, SECOND_DOMAIN) for k in LISTS}
    assert all(set(entry) == FIELDS for entry in lists.values())
    bounces, unsubscribes = lists[DOMAIN, "bounces"], lists[DOMAIN, "unsubscribes"]
    assert (bounces["status"], bounces["error"]) == ("ok", None)
    assert {c: bounces[c] for c in COUNTS} == {
        "pulled": 3, "inserted": 3, "updated": 0, "removed": 0, "adopted": 0, "pushed": 1, "rejected": 1,
        "deleted": 0, "skipped": 0}
    assert (bounces["pending_rows"], bounces["rejected_rows"]) == (0, 1)
    assert unsubscribes["status"] == "failed"
    assert unsubscribes["error"].startswith("pull incomplete, nothing changed:")
    assert "503" in unsubscribes["error"]
    assert {c: unsubscribes[c] for c in COUNTS} == dict.fromkeys(COUNTS, 0)
    assert (unsubscribes["pending_rows"], unsubscribes["rejected_rows"]) == (1, 0)
    complaints = lists[DOMAIN, "complaints"]
    assert (complaints["status"], complaints["pulled"], complaints["inserted"]) == ("ok", 1, 1)
    assert (lists[SECOND_DOMAIN, "complaints"]["status"], lists[SECOND_DOMAIN, "complaints"]["inserted"]) == (
        "ok", 2)
    assert lists[SECOND_DOMAIN, "bounces"] == never_run(SECOND_DOMAIN, "bounces")
    for (domain, kind), entry in lists.items():
        if entry["status"] is not None:
            finished = await last_finished(pool, domain, kind)
            assert datetime.fromisoformat(entry["last_run_at"]) == finished


async def test_status_shows_the_latest_run_of_each_list(
        pool, emulator, store, make_client, sleeps, env, status):
    await arrange_runs(pool, emulator, store, make_client, sleeps)
    emulator.faults.clear()
    again = await Reconciler(store, make_client(), ReconcileOptions()).reconcile(
        uuid.uuid4(), DOMAIN, UNSUBSCRIBES)
    assert again.status == "ok"

    unsubscribes = (await status("--json", env=env)).lists()[DOMAIN, "unsubscribes"]

    assert (unsubscribes["status"], unsubscribes["error"], unsubscribes["pushed"]) == ("ok", None, 1)
    assert (unsubscribes["pending_rows"], unsubscribes["rejected_rows"]) == (0, 0)
    assert datetime.fromisoformat(unsubscribes["last_run_at"]) == await last_finished(
        pool, DOMAIN, "unsubscribes")


async def test_status_table_names_each_list_with_its_status_rows_and_last_error(
        pool, emulator, store, make_client, sleeps, env, status):
    await arrange_runs(pool, emulator, store, make_client, sleeps)

    outcome = await status(env=both_domains(env))

    assert outcome.code == 0
    lines = outcome.out.splitlines()
    assert lines[0].split() == ["counts", "of", "the", "last", "run", "rows", "now"]
    assert lines[1].split() == ["domain", "list", "last", "run", "(UTC)", "status", *COUNTS,
                                "pending", "rejected"]

    def line_of(domain: str, kind: str) -> list[str]:
        [found] = [line for line in lines if line.startswith(f"{domain} ") and f" {kind} " in line]
        return found.split()

    for domain in (DOMAIN, SECOND_DOMAIN):
        for kind in LISTS:
            assert line_of(domain, kind)[:2] == [domain, kind]
    # status, the last run's counts (as `run` prints them), the rows pending and rejected now
    assert line_of(DOMAIN, "bounces")[4:] == ["ok", "3", "3", "0", "0", "0", "1", "1", "0", "0", "0", "1"]
    assert line_of(DOMAIN, "unsubscribes")[4:] == ["failed", *["0"] * len(COUNTS), "1", "0"]
    assert line_of(SECOND_DOMAIN, "complaints")[4:7] == ["ok", "2", "2"]
    assert line_of(SECOND_DOMAIN, "bounces")[2:] == ["never", "-", *["0"] * len(COUNTS), "0", "0"]
    finished = await last_finished(pool, DOMAIN, "bounces")
    assert line_of(DOMAIN, "bounces")[2:4] == finished.strftime("%Y-%m-%d %H:%M:%S").split()
    # The one error, right under its list's line.
    [error_at] = [i for i, line in enumerate(lines) if "last error:" in line]
    assert lines[error_at - 1].split()[:2] == [DOMAIN, "unsubscribes"]
    assert lines[error_at].strip().startswith("last error: pull incomplete, nothing changed:")


async def test_status_never_prints_the_api_key_and_does_not_need_one(
        pool, emulator, store, make_client, sleeps, env, status):
    await arrange_runs(pool, emulator, store, make_client, sleeps)

    for flags in ((), ("--json",)):
        with_key = await status(*flags, env=env)
        with_key.assert_no_secret()
        no_mailgun = {k: v for k, v in env.items() if not k.startswith("MAILGUN_API")}
        without_key = await status(*flags, env=no_mailgun)
        assert (without_key.code, without_key.out) == (0, with_key.out)


async def test_status_without_a_database_url_names_the_missing_setting(status):
    outcome = await status("--json", env={"MAILGUN_API_KEY": API_KEY, "MAILGUN_DOMAINS": DOMAIN})

    assert outcome.code == 2
    assert outcome.out == ""
    assert outcome.err.startswith("mailgun-sync: ")
    assert "DATABASE_URL" in outcome.err
    outcome.assert_no_secret()


# ---- domains not configured ----------------------------------------------------------------------


async def test_status_leaves_out_a_domain_no_longer_configured_unless_asked_with_all(
        pool, emulator, store, make_client, sleeps, env, status):
    await arrange_runs(pool, emulator, store, make_client, sleeps)  # SECOND_DOMAIN ran once

    shown = await status("--json", env=env)
    assert {domain for domain, _ in shown.lists()} == {DOMAIN}
    assert SECOND_DOMAIN not in (await status(env=env)).out

    everything = await status("--json", "--all", env=env)
    assert {domain for domain, _ in everything.lists()} == {DOMAIN, SECOND_DOMAIN}
    assert f"{SECOND_DOMAIN} " in (await status("--all", env=env)).out


async def test_status_lists_the_pending_rows_of_a_domain_nothing_syncs(pool, env, status):
    """An application's INSERT with a misspelt domain: its rows are never pushed, and status says
    which domain and how many, in the table and in --json."""
    typo = "mg.exmaple.com"
    for address in ("one@example.com", "two@example.com"):
        await insert_row(pool, BOUNCES, typo, address)
    await insert_row(pool, UNSUBSCRIBES, typo, "three@example.com", tags=["news"])
    await insert_row(pool, BOUNCES, DOMAIN, "synced-domain@example.com")

    outcome = await status("--json", env=env)
    assert outcome.report()["unsynced_pending"] == [
        {"domain": typo, "list": "bounces", "pending_rows": 2},
        {"domain": typo, "list": "unsubscribes", "pending_rows": 1}]
    assert {domain for domain, _ in outcome.lists()} == {DOMAIN}

    lines = (await status(env=env)).out.splitlines()
    at = lines.index("pending rows of domains not synced (nothing pushes them: correct their domain, "
                     "or sync the domain):")
    assert [line.split() for line in lines[at + 1:at + 3]] == [[typo, "bounces", "2"],
                                                               [typo, "unsubscribes", "1"]]


async def test_past_a_hundred_lists_status_prints_a_summary_and_the_lists_wanting_attention(
        pool, env, status, store):
    domains = [f"mg{n:02}.many.example" for n in range(30)]  # 120 lists
    at = datetime.now(UTC)
    for n, domain in enumerate(domains[:28]):
        failed = n == 7
        await store.record_run(uuid.uuid4(), domain, BOUNCES,
                               status=RunStatus.FAILED if failed else RunStatus.OK, dry_run=False,
                               counts=RunCounts(), error="Mailgun answered 401" if failed else None,
                               started=at, finished=at)
    await insert_row(pool, BOUNCES, domains[3], "waiting@example.com")
    many = {**env, "MAILGUN_DOMAINS": ",".join(domains)}

    summary = await status(env=many)
    every = await status("--lists", env=many)

    assert summary.code == 0
    assert summary.out.splitlines()[:3] == [
        "120 lists of 30 domains (a line for each: status --lists)",
        "last runs: 92 never run, 27 ok, 1 failed",
        "pending rows: 1 in 1 lists; rejected rows: 0 in 0 lists"]
    assert "lists whose last run did not end ok (93, the first 20):" in summary.out
    assert "  mg07.many.example bounces  failed  " in summary.out
    assert "Mailgun answered 401" in summary.out
    assert len(every.out.splitlines()) > 120


async def test_an_ok_run_recorded_after_a_later_failed_one_still_counts_as_the_last_success(store, pool):
    """Two processes' runs of a list may be recorded in either order (record_run says so): the
    list's last success is the latest ok run in the run log, whichever record came first."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ok_at, failed_at = t0 + timedelta(seconds=10), t0 + timedelta(seconds=20)
    # A CronJob's ok run ends at 10 s and is recorded late; a daemon's failed run ends at 20 s first.
    await store.record_run(uuid.uuid4(), OTHER_LISTS_DOMAIN, SuppressionList.BOUNCES, status=RunStatus.FAILED,
                           dry_run=False, counts=RunCounts(), error="Mailgun answered 500",
                           started=t0 + timedelta(seconds=15), finished=failed_at)
    await store.record_run(uuid.uuid4(), OTHER_LISTS_DOMAIN, SuppressionList.BOUNCES, status=RunStatus.OK,
                           dry_run=False, counts=RunCounts(), error=None,
                           started=t0, finished=ok_at)
    in_log = await pool.fetchval("SELECT max(finished_at) FROM mailgun.sync_runs "
                                 "WHERE domain = $1 AND status = 'ok'", OTHER_LISTS_DOMAIN)
    successes = {key: last_ok for key, (last_ok, _) in (await store.list_health()).items()}
    assert in_log == ok_at
    assert successes.get((OTHER_LISTS_DOMAIN, "bounces")) == ok_at, successes
