"""`mailgun-sync run` (and `migrate`) called in-process as `cli(argv, env)`: what it prints, its exit
code, how it names a bad setting, and that the API key shows up nowhere, whatever happens; and, as a
child process, how it ends when a signal stops it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import UTC, datetime, timedelta

import pytest

from tests.support.account import API_KEY, DOMAIN
from tests.support.mirror import insert_row, rows, snapshot
from worker.emulator import Fault
from worker.records import SYNCED_LISTS, SuppressionList
from worker.sql import migrations

SECOND_DOMAIN = "mg.second-example.org"
LISTS = [kind.value for kind in SYNCED_LISTS]
RESULT_FIELDS = {"domain", "list", "status", "pulled", "inserted", "updated", "removed", "pushed",
                 "rejected", "error"}
COUNTS = ("pulled", "inserted", "updated", "removed", "pushed", "rejected")
CREATED = "Fri, 02 Jan 2026 03:04:05 UTC"
AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)
DB_PASSWORD = "db-secret-password"
DEAD_DATABASE = f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:1/x"
EVERY_VERSION = [m.version for m in migrations()]


@pytest.fixture
def env(emulator, database_url, pool) -> dict[str, str]:
    """A complete environment for the emulator and the test database (emptied for the test); no
    waiting between retries."""
    return {
        "MAILGUN_API_KEY": API_KEY,
        "MAILGUN_API_BASE": str(emulator.base_url),
        "MAILGUN_DOMAINS": DOMAIN,
        "DATABASE_URL": database_url,
        "MAILGUN_BACKOFF_MAX": "0.01",
    }


async def sync_runs(pool) -> list[tuple[str, str, str]]:
    found = await pool.fetch("SELECT domain, list, status FROM mailgun.sync_runs ORDER BY domain, list")
    return [(r["domain"], r["list"], r["status"]) for r in found]


# ---- what a run reports --------------------------------------------------------------------------


async def test_json_reports_every_list_of_every_configured_domain_and_exits_0(invoke, env, emulator, pool):
    emulator.declare(SECOND_DOMAIN)
    emulator.seed(DOMAIN, "bounces", [{"address": "remote@example.com", "code": "550"}])
    emulator.seed(SECOND_DOMAIN, "complaints", [{"address": "angry@example.com"}])
    await insert_row(pool, "unsubscribes", DOMAIN, "local@example.com", tags=["promo"])

    outcome = await invoke("run", "--json", env={**env, "MAILGUN_DOMAINS": f"{DOMAIN}, {SECOND_DOMAIN}"})

    assert outcome.code == 0, outcome.err
    report = outcome.report()
    assert report["ok"] is True
    assert [(r["domain"], r["list"]) for r in report["results"]] == [
        (domain, kind) for domain in (DOMAIN, SECOND_DOMAIN) for kind in LISTS]
    for result in report["results"]:
        assert set(result) >= RESULT_FIELDS
        assert (result["status"], result["error"]) == ("ok", None)
    assert {k: outcome.result(DOMAIN, "bounces")[k] for k in COUNTS} == {
        "pulled": 1, "inserted": 1, "updated": 0, "removed": 0, "pushed": 0, "rejected": 0}
    assert outcome.result(DOMAIN, "unsubscribes")["pushed"] == 1
    assert (outcome.result(SECOND_DOMAIN, "complaints")["pulled"],
            outcome.result(SECOND_DOMAIN, "complaints")["inserted"]) == (1, 1)
    assert [r["address"] for r in emulator.records(DOMAIN, "unsubscribes")] == ["local@example.com"]
    assert len(await sync_runs(pool)) == 2 * len(LISTS)


async def test_repeated_domain_flags_replace_the_configured_domains(invoke, env, emulator, pool):
    emulator.declare(SECOND_DOMAIN)
    outcome = await invoke("run", "--json", "--domain", SECOND_DOMAIN, "--domain", DOMAIN,
                           env={**env, "MAILGUN_DOMAINS": "mg.not-this-one.example.net"})
    assert outcome.code == 0, outcome.err
    assert [(r["domain"], r["list"]) for r in outcome.report()["results"]] == [
        (domain, kind) for domain in (SECOND_DOMAIN, DOMAIN) for kind in LISTS]


async def test_list_flag_restricts_the_run_to_that_list(invoke, env, emulator, pool):
    emulator.seed(DOMAIN, "complaints", [{"address": "angry@example.com"}])
    outcome = await invoke("run", "--json", "--list", "bounces", env=env)
    assert outcome.code == 0, outcome.err
    assert [(r["domain"], r["list"]) for r in outcome.report()["results"]] == [(DOMAIN, "bounces")]
    assert await sync_runs(pool) == [(DOMAIN, "bounces", "ok")]
    assert await rows(pool, "complaints") == {}
    assert {r.path.split("/")[-1] for r in emulator.requests} == {"bounces"}


async def test_repeated_list_flags_run_those_lists_in_the_order_given(invoke, env):
    outcome = await invoke("run", "--json", "--list", "complaints", "--list", "bounces", env=env)
    assert outcome.code == 0, outcome.err
    assert [r["list"] for r in outcome.report()["results"]] == ["complaints", "bounces"]


async def test_without_json_a_table_names_each_domain_list_and_status(invoke, env, emulator):
    emulator.declare(SECOND_DOMAIN)
    outcome = await invoke("run", env={**env, "MAILGUN_DOMAINS": f"{DOMAIN},{SECOND_DOMAIN}"})
    assert outcome.code == 0, outcome.err
    lines = outcome.out.splitlines()
    assert lines[0].split()[:3] == ["domain", "list", "status"]
    body = [line.split()[:3] for line in lines[2:]]
    assert body == [[domain, kind, "ok"] for domain in (DOMAIN, SECOND_DOMAIN) for kind in LISTS]


async def test_logs_are_json_lines_with_one_summary_per_list_bound_to_the_run(invoke, env):
    outcome = await invoke("run", "--json", env=env)
    assert outcome.code == 0, outcome.err
    summaries = [line for line in outcome.logs() if line["event"] == "list_reconciled"]
    assert [(s["domain"], s["list"], s["status"]) for s in summaries] == [
        (DOMAIN, kind, "ok") for kind in LISTS]
    assert len({s["run_id"] for s in summaries}) == 1


async def test_a_failed_list_is_logged_at_error_and_an_ok_one_at_info(invoke, env, emulator):
    emulator.fail_next(503, times=None, list="complaints")
    outcome = await invoke("run", "--json", "--list", "bounces", "--list", "complaints",
                           env={**env, "MAILGUN_MAX_ATTEMPTS": "1"})
    assert outcome.code == 1
    levels = {line["list"]: line["level"] for line in outcome.logs() if line["event"] == "list_reconciled"}
    assert levels == {"bounces": "info", "complaints": "error"}


async def test_each_in_process_call_logs_at_its_own_level(invoke, env):
    """Loggers are not left bound to the first call's configuration."""
    chatty = await invoke("run", "--json", "--list", "bounces", env=env)
    assert [line["event"] for line in chatty.logs()] == ["list_reconciled"]
    quiet = await invoke("--log-level", "ERROR", "run", "--json", "--list", "bounces", env=env)
    assert quiet.code == 0
    assert quiet.err == ""
    chatty_again = await invoke("run", "--json", "--list", "bounces", env=env)
    assert [line["event"] for line in chatty_again.logs()] == ["list_reconciled"]


# ---- failures ------------------------------------------------------------------------------------


async def test_a_failing_list_exits_1_and_its_error_is_in_the_report(invoke, env, emulator, pool):
    emulator.fail_next(503, times=None, list="complaints")
    outcome = await invoke("run", "--json", env={**env, "MAILGUN_MAX_ATTEMPTS": "1"})

    assert outcome.code == 1
    report = outcome.report()
    assert report["ok"] is False
    assert [(r["list"], r["status"]) for r in report["results"]] == [
        ("bounces", "ok"), ("unsubscribes", "ok"), ("complaints", "failed"), ("allowlist", "ok")]
    error = outcome.result(DOMAIN, "complaints")["error"]
    assert "pull incomplete, nothing changed" in error
    assert "503" in error
    assert await sync_runs(pool) == [(DOMAIN, "allowlist", "ok"), (DOMAIN, "bounces", "ok"),
                                     (DOMAIN, "complaints", "failed"), (DOMAIN, "unsubscribes", "ok")]
    outcome.assert_no_secret(DB_PASSWORD)


async def test_the_table_shows_a_failed_lists_error_under_its_line(invoke, env, emulator):
    emulator.fail_next(503, times=None)
    outcome = await invoke("run", "--list", "bounces", env={**env, "MAILGUN_MAX_ATTEMPTS": "1"})
    assert outcome.code == 1
    lines = outcome.out.splitlines()
    assert lines[2].split()[:3] == [DOMAIN, "bounces", "failed"]
    assert lines[3].strip().startswith("error: pull incomplete")


async def test_a_guarded_list_exits_1_and_allow_mass_delete_lets_it_through(invoke, env, emulator, pool):
    kept = [f"both{i:03}@example.com" for i in range(30)]
    for address in kept:
        await insert_row(pool, "bounces", DOMAIN, address, state="synced", synced_at=AN_HOUR_AGO)
    emulator.seed(DOMAIN, "bounces", [{"address": a} for a in kept[15:]])

    guarded = await invoke("run", "--json", "--list", "bounces", env=env)
    assert guarded.code == 1
    assert (guarded.result(DOMAIN, "bounces")["status"], guarded.result(DOMAIN, "bounces")["removed"]) == (
        "guarded", 0)
    assert "SYNC_MAX_DELETE_FRACTION" in guarded.result(DOMAIN, "bounces")["error"]
    assert len(await rows(pool, "bounces")) == 30

    allowed = await invoke("run", "--json", "--list", "bounces", "--allow-mass-delete", env=env)
    assert allowed.code == 0, allowed.out
    assert allowed.result(DOMAIN, "bounces")["removed"] == 15
    assert sorted(await rows(pool, "bounces")) == kept[15:]


async def test_max_delete_fraction_flag_overrides_the_environment(invoke, env, emulator, pool):
    kept = [f"both{i:03}@example.com" for i in range(30)]
    for address in kept:
        await insert_row(pool, "bounces", DOMAIN, address, state="synced", synced_at=AN_HOUR_AGO)
    emulator.seed(DOMAIN, "bounces", [{"address": a} for a in kept[15:]])
    outcome = await invoke("run", "--json", "--list", "bounces", "--max-delete-fraction", "0.6",
                           env={**env, "SYNC_MAX_DELETE_FRACTION": "0.1"})
    assert outcome.code == 0, outcome.out
    assert outcome.result(DOMAIN, "bounces")["removed"] == 15


# ---- settings ------------------------------------------------------------------------------------


BAD_SETTINGS = [  # (variable, value); None: not set at all
    ("MAILGUN_API_KEY", None),
    ("MAILGUN_API_KEY", "   "),
    ("MAILGUN_MAX_ATTEMPTS", "abc"),
    ("MAILGUN_MAX_ATTEMPTS", "0"),
    ("MAILGUN_BACKOFF_MAX", "soon"),
    ("MAILGUN_BACKOFF_MAX", "0"),
    ("SYNC_MAX_DELETE_FRACTION", "2"),
    ("MAILGUN_API_BASE", "http://example.com"),
    ("MAILGUN_API_BASE", "not a url"),
    ("MAILGUN_DOMAINS", None),
    ("MAILGUN_DOMAINS", " , "),
    ("MAILGUN_DOMAINS", "no-dot"),
    ("DATABASE_URL", None),
    ("DATABASE_URL", "mysql://db.example.com/mirror"),
    ("DATABASE_URL", f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:notaport/mirror"),
]


@pytest.mark.parametrize(("setting", "value"), BAD_SETTINGS, ids=[f"{s}={v}" for s, v in BAD_SETTINGS])
async def test_a_missing_or_malformed_setting_exits_2_with_one_line_naming_it(
        invoke, env, emulator, setting, value):
    changed = {**env, setting: value}
    outcome = await invoke("run", "--json", env={k: v for k, v in changed.items() if v is not None})

    assert outcome.code == 2
    assert outcome.out == ""
    [line] = outcome.err.splitlines()
    assert line.startswith(f"mailgun-sync: {setting}: ")
    outcome.assert_no_secret(DB_PASSWORD)
    assert not emulator.requests


@pytest.mark.parametrize(("flags", "setting"), [
    (["--max-attempts", "abc"], "MAILGUN_MAX_ATTEMPTS"),
    (["--backoff-max", "-1"], "MAILGUN_BACKOFF_MAX"),
    (["--api-base", "http://example.com"], "MAILGUN_API_BASE"),
    (["--max-delete-fraction", "-0.5"], "SYNC_MAX_DELETE_FRACTION"),
    (["--domain", "not a domain"], "MAILGUN_DOMAINS"),
    (["--list", "bogus"], "arguments"),
    (["--no-such-flag"], "arguments"),
])
async def test_a_malformed_flag_exits_2_with_one_line_naming_it(invoke, env, emulator, flags, setting):
    outcome = await invoke("run", *flags, env=env)
    assert outcome.code == 2
    [line] = outcome.err.splitlines()
    assert line.startswith(f"mailgun-sync: {setting}: ")
    assert not emulator.requests


async def test_flags_override_malformed_environment_settings(invoke, env, emulator):
    outcome = await invoke(
        "run", "--json", "--max-attempts", "2", "--backoff-max", "0.01", "--api-base", str(emulator.base_url),
        "--database-url", env["DATABASE_URL"],
        env={**env, "MAILGUN_MAX_ATTEMPTS": "abc", "MAILGUN_BACKOFF_MAX": "soon",
             "MAILGUN_API_BASE": "http://example.com", "DATABASE_URL": DEAD_DATABASE})
    assert outcome.code == 0, outcome.err
    assert outcome.report()["ok"] is True


async def test_max_attempts_flag_wins_over_the_environment(invoke, env, emulator):
    emulator.fail_next(503, times=1)
    once = await invoke("run", "--json", "--list", "bounces", env={**env, "MAILGUN_MAX_ATTEMPTS": "1"})
    assert once.code == 1
    emulator.fail_next(503, times=1)
    twice = await invoke("run", "--json", "--list", "bounces", "--max-attempts", "2",
                         env={**env, "MAILGUN_MAX_ATTEMPTS": "1"})
    assert twice.code == 0, twice.out


# ---- the API key stays secret --------------------------------------------------------------------


async def test_the_api_key_appears_nowhere_in_a_successful_run_logged_at_debug(invoke, env, emulator, pool):
    emulator.seed(DOMAIN, "bounces", [{"address": "remote@example.com"}])
    await insert_row(pool, "complaints", DOMAIN, "local@example.com")
    outcome = await invoke("--log-level", "DEBUG", "run", "--json", env=env)
    assert outcome.code == 0, outcome.err
    assert outcome.logs()
    outcome.assert_no_secret(DB_PASSWORD)


async def test_a_refused_key_fails_every_list_without_showing_the_key(invoke, env, emulator):
    emulator.api_key = "key-the-right-one"
    outcome = await invoke("--log-level", "DEBUG", "run", "--json", env=env)

    assert outcome.code == 1
    report = outcome.report()
    assert [r["status"] for r in report["results"]] == ["failed"] * len(LISTS)
    assert all("401" in r["error"] for r in report["results"])
    outcome.assert_no_secret(DB_PASSWORD)
    assert "key-the-right-one" not in outcome.out + outcome.err


async def test_retries_and_failures_do_not_show_the_key(invoke, env, emulator, pool):
    await insert_row(pool, "bounces", DOMAIN, "local@example.com")
    emulator.fail_next(503, times=None, method="POST")
    emulator.fail_next(500, times=2, method="GET")
    outcome = await invoke("--log-level", "DEBUG", "run", "--json",
                           env={**env, "MAILGUN_MAX_ATTEMPTS": "3"})
    assert outcome.code == 1
    assert "push stopped, unconfirmed rows stay pending" in outcome.result(DOMAIN, "bounces")["error"]
    assert any(line["event"] == "retry_scheduled" for line in outcome.logs())
    outcome.assert_no_secret(DB_PASSWORD)


async def test_a_table_report_of_a_refused_key_does_not_show_the_key(invoke, env, emulator):
    emulator.api_key = "key-the-right-one"
    outcome = await invoke("run", env=env)
    assert outcome.code == 1
    assert outcome.out.count("error: ") == len(LISTS)
    outcome.assert_no_secret(DB_PASSWORD)


# ---- the database --------------------------------------------------------------------------------


async def test_a_database_without_the_schema_asks_for_migrate_which_then_makes_run_work(
        invoke, env, emulator, empty_database_url):
    env = {**env, "DATABASE_URL": empty_database_url}

    refused = await invoke("run", "--json", env=env)
    assert refused.code == 1
    assert refused.out == ""
    [line] = refused.err.splitlines()
    assert "run `mailgun-sync migrate`" in line
    assert not emulator.requests

    applied = await invoke("migrate", env=env)
    assert applied.code == 0, applied.err
    assert applied.out == f"applied migrations {EVERY_VERSION}\n"

    again = await invoke("migrate", env=env)
    assert again.code == 0, again.err
    assert again.out == "schema already up to date\n"

    ran = await invoke("run", "--json", env=env)
    assert ran.code == 0, ran.err
    assert ran.report()["ok"] is True


async def test_migrate_takes_the_database_url_flag_and_needs_a_wellformed_one(invoke, empty_database_url):
    missing = await invoke("migrate", env={})
    assert missing.code == 2
    [line] = missing.err.splitlines()
    assert line.startswith("mailgun-sync: DATABASE_URL: ")

    malformed = await invoke("migrate", "--database-url", "mysql://db.example.com/mirror", env={})
    assert malformed.code == 2
    [line] = malformed.err.splitlines()
    assert line.startswith("mailgun-sync: DATABASE_URL: ")

    applied = await invoke("migrate", "--database-url", empty_database_url,
                           env={"DATABASE_URL": DEAD_DATABASE})
    assert applied.code == 0, applied.err
    assert applied.out == f"applied migrations {EVERY_VERSION}\n"


@pytest.mark.parametrize("command", [["run", "--json"], ["migrate"]], ids=["run", "migrate"])
async def test_an_unreachable_database_is_one_line_naming_postgresql(invoke, env, emulator, command):
    outcome = await invoke(*command, env={**env, "DATABASE_URL": DEAD_DATABASE})
    assert outcome.code == 1
    assert outcome.out == ""
    assert "Traceback" not in outcome.err
    [line] = outcome.err.splitlines()
    assert line.startswith("mailgun-sync: PostgreSQL ")
    assert not emulator.requests
    outcome.assert_no_secret(DB_PASSWORD)


# ---- dry run -------------------------------------------------------------------------------------


async def test_dry_run_reports_what_would_change_and_changes_neither_side(invoke, env, emulator, pool):
    emulator.seed(DOMAIN, "bounces", [
        {"address": "same@example.com", "code": "550", "created_at": CREATED},
        {"address": "changed@example.com", "code": "554", "created_at": CREATED},
        {"address": "remote-only@example.com", "created_at": CREATED},
    ])
    for address in ("same@example.com", "changed@example.com", "gone@example.com"):
        await insert_row(pool, "bounces", DOMAIN, address, state="synced", synced_at=AN_HOUR_AGO,
                         code="550", created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    await insert_row(pool, "bounces", DOMAIN, "local-only@example.com")
    await insert_row(pool, "unsubscribes", DOMAIN, "optout@example.com", tags=["news"])
    emulator.seed(DOMAIN, "complaints", [{"address": "angry@example.com"}])
    mirror_before = await snapshot(pool)
    remote_before = {kind: emulator.records(DOMAIN, kind) for kind in LISTS}

    outcome = await invoke("run", "--dry-run", "--json", env=env)

    assert outcome.code == 0, outcome.err
    assert outcome.report()["ok"] is True
    assert {k: outcome.result(DOMAIN, "bounces")[k] for k in COUNTS} == {
        "pulled": 3, "inserted": 1, "updated": 1, "removed": 1, "pushed": 1, "rejected": 0}
    assert outcome.result(DOMAIN, "unsubscribes")["pushed"] == 1
    assert outcome.result(DOMAIN, "complaints")["inserted"] == 1
    assert await snapshot(pool) == mirror_before
    assert await sync_runs(pool) == []
    assert {kind: emulator.records(DOMAIN, kind) for kind in LISTS} == remote_before
    assert {r.method for r in emulator.requests} == {"GET"}


async def test_the_cli_takes_allowlist_as_a_list_name(invoke, env, emulator):
    emulator.seed(DOMAIN, SuppressionList.ALLOWLIST, [{"value": "vip@example.com"}])
    outcome = await invoke("run", "--json", "--list", "allowlist", env=env)
    assert outcome.code == 0, outcome.err
    assert [(r["list"], r["inserted"]) for r in outcome.report()["results"]] == [("allowlist", 1)]


async def test_a_dry_run_validates_local_additions_so_its_counts_are_the_runs(invoke, env, emulator, pool):
    for address in ("one@example.com", "two@example.com", "not an address"):
        await insert_row(pool, "bounces", DOMAIN, address)
    await insert_row(pool, "allowlist", DOMAIN, "partner..example", type="domain")

    dry = await invoke("run", "--dry-run", "--json", env=env)
    real = await invoke("run", "--json", env=env)

    assert (dry.code, real.code) == (0, 0), dry.err + real.err
    def counts(outcome):
        return [(r["pushed"], r["rejected"]) for r in outcome.report()["results"]]

    assert counts(dry) == counts(real)
    assert (dry.result(DOMAIN, "bounces")["pushed"], dry.result(DOMAIN, "bounces")["rejected"]) == (2, 1)
    assert dry.result(DOMAIN, "allowlist")["rejected"] == 1


async def test_a_dry_run_says_so_at_the_top_of_its_text_and_its_json(invoke, env):
    text = await invoke("run", "--dry-run", env=env)
    assert text.code == 0, text.err
    assert text.out.splitlines()[0] == "dry run: nothing was changed; the counts are what a run would do now"
    as_json = await invoke("run", "--dry-run", "--json", env=env)
    assert next(iter(as_json.report())) == "dry_run"
    assert as_json.report()["dry_run"] is True
    real = await invoke("run", "--json", env=env)
    assert real.report()["dry_run"] is False
    assert "dry run" not in (await invoke("run", env=env)).out


# ---- rows nothing syncs --------------------------------------------------------------------------


async def test_a_run_warns_once_per_domain_it_does_not_sync_that_has_pending_rows(invoke, env, pool):
    typo = "mg.exmaple.com"
    for address in ("one@example.com", "two@example.com"):
        await insert_row(pool, "bounces", typo, address)
    await insert_row(pool, "complaints", typo, "three@example.com")

    outcome = await invoke("run", "--json", env=env)

    assert outcome.code == 0, outcome.err
    [warning] = [line for line in outcome.logs() if line["event"] == "pending_rows_of_unsynced_domain"]
    assert (warning["level"], warning["domain"], warning["rows"]) == ("warning", typo, 3)
    assert warning["lists"] == {"bounces": 2, "complaints": 1}
    assert {line["domain"] for line in outcome.logs() if line["event"] == "list_reconciled"} == {DOMAIN}
    # A run narrowed to some domains does not know what the others are: it says nothing of them.
    narrowed = await invoke("run", "--json", "--domain", DOMAIN, env=env)
    assert not [line for line in narrowed.logs() if line["event"] == "pending_rows_of_unsynced_domain"]


# ---- stopped by a signal -------------------------------------------------------------------------


async def start_held_run(emulator, env, *argv: str) -> asyncio.subprocess.Process:
    """`mailgun-sync ARGV` as a child process, returned once its first read of bounces is parked
    at the emulator (stderr is a pipe: the logs are JSON lines)."""
    emulator.inject(Fault(action="hold", method="GET", list="bounces", times=None))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *argv, "--list", "bounces", env={**os.environ, **env},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        await emulator.until_held()
    return process


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_a_run_stopped_by_sigint_or_sigterm_logs_its_list_failed_says_so_and_exits_128_plus_the_signal(
        emulator, env, pool, sig, code):
    # A CronJob's pod gets SIGTERM; a shell reports a command killed by signal N as 128 + N.
    process = await start_held_run(emulator, env, "run")
    try:
        process.send_signal(sig)
        out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        emulator.release()

    assert process.returncode == code, err.decode()
    assert out == b""  # no table: the run did not end
    logs = [json.loads(line) for line in err.decode().splitlines()]
    [reconciled] = [line for line in logs if line["event"] == "list_reconciled"]
    assert (reconciled["status"], reconciled["level"]) == ("failed", "warning")
    assert reconciled["error"] == "interrupted before the end; unconfirmed rows stay pending"
    assert logs[-1]["event"] == "interrupted"
    assert (logs[-1]["signal"], logs[-1]["exit_code"], logs[-1]["level"]) == (sig.name, code, "warning")
    assert await sync_runs(pool) == [(DOMAIN, "bounces", "failed")]
