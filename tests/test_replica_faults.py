"""Replicas sharing the schedule through what a real deployment brings: rolling updates that change
the domains or the schedule, clocks that disagree, a database that goes away, stops mid-claim,
thousands of lists, cron lists across restarts. Real daemon processes throughout. (A run on a
connection that a proxy keeps open but forwards nothing through is not noticed: README,
Reliability.)"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
from collections.abc import AsyncIterator

import pytest

from tests.support.account import API_KEY
from tests.support.replicas import FAKETIME, Fleet, Replica, run_starts, slow_emulator
from tests.support.replicas import fleet as replicas_fleet
from worker.emulator import Fault, MailgunEmulator
from worker.records import SYNCED_LISTS

pytestmark = pytest.mark.slow

DOMAINS = tuple(f"mg{n}.faults.example" for n in range(6))
INTERVAL = 2.0
CLAIM_SLACK = 1.5


@pytest.fixture
async def emulator() -> AsyncIterator[MailgunEmulator]:
    async with slow_emulator(DOMAINS) as running:
        yield running


def fleet(emulator: MailgunEmulator, database_url: str) -> contextlib.AbstractAsyncContextManager[Fleet]:
    return replicas_fleet(emulator, database_url, domains=DOMAINS, interval=INTERVAL)


async def until_runs(pool, count: int) -> None:
    for _ in range(200):
        if await pool.fetchval("SELECT count(*) FROM mailgun.sync_runs") >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} runs")


async def stopped(replica: Replica) -> None:
    replica.process.send_signal(signal.SIGTERM)
    await replica.process.wait()


def longest_gap(times, until) -> float:
    after = [t for t in times if t < until]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(after)]
    gaps.append((until - after[-1]).total_seconds())
    return max(gaps)


async def test_replicas_planning_different_domains_still_run_each_list_once_per_interval(
        emulator, pool, database_url):
    """A rolling update that adds a domain (or two deployments on one database, each with its own
    MAILGUN_DOMAINS): every list is still reconciled once per interval, and none goes two
    intervals without a run."""
    async with fleet(emulator, database_url) as replicas:
        await replicas.start(MAILGUN_DOMAINS=",".join(DOMAINS[:3]))
        await replicas.start(MAILGUN_DOMAINS=",".join(DOMAINS[3:]))
        await asyncio.sleep(3)
        since = await pool.fetchval("SELECT now()")
        await asyncio.sleep(6 * INTERVAL)
        until = await pool.fetchval("SELECT now()")

    starts = await run_starts(pool, since)
    lists = len(DOMAINS) * len(SYNCED_LISTS)
    intervals = (until - since).total_seconds() / INTERVAL
    runs = sum(len([t for t in s if t < until]) for s in starts.values())
    gap = max(longest_gap(t, until) for t in starts.values())
    assert len(starts) == lists
    assert runs / lists / intervals >= 0.7 and gap <= 2 * INTERVAL + CLAIM_SLACK, (
        f"{runs / lists / intervals:.2f} runs per list per interval, longest gap {gap:.1f} s")


@pytest.mark.skipif(FAKETIME is None, reason="pip install libfaketime")
async def test_a_replica_whose_clock_is_ahead_does_not_delay_new_lists(emulator, pool, database_url):
    """Times come from the database's clock: a list new to the schedule is due within SYNC_JITTER
    (at most 5 s), whichever replica planned it and whatever its clock says."""
    async with fleet(emulator, database_url) as replicas:
        await replicas.start(clock_offset_s=3600)
        await replicas.start()  # a replica with the right time, beside it
        await asyncio.sleep(8)
        ran = await pool.fetchval("SELECT count(DISTINCT (domain, list)) FROM mailgun.sync_runs")
        due = await pool.fetchval("SELECT max(due_at) - now() FROM mailgun.schedule")
    assert ran == len(DOMAINS) * len(SYNCED_LISTS), f"{ran} lists ran in 8 s; the last is due in {due}"


@pytest.mark.skipif(FAKETIME is None, reason="pip install libfaketime")
async def test_status_shows_the_last_run_when_replica_clocks_differ(emulator, pool, database_url, invoke):
    """`status` shows each list's last run: a replica whose clock is ahead ran the lists once, then
    the others' runs fail; status must say they fail, not show the old run as the last."""
    async with fleet(emulator, database_url) as replicas:
        first = await replicas.start(MAILGUN_DOMAINS=DOMAINS[0])  # puts the lists on the schedule
        await until_runs(pool, len(SYNCED_LISTS))
        await stopped(first)
        ahead = await replicas.start(clock_offset_s=600, MAILGUN_DOMAINS=DOMAINS[0])
        await until_runs(pool, 2 * len(SYNCED_LISTS))
        await stopped(ahead)
        emulator.faults.clear()
        emulator.inject(Fault(action="status", status=500, times=None, method="GET"))
        await replicas.start(MAILGUN_DOMAINS=DOMAINS[0], MAILGUN_BACKOFF_MAX="0.1")
        await asyncio.sleep(3 * INTERVAL)
    shown = await pool.fetch("SELECT list, status FROM mailgun.last_runs WHERE domain = $1", DOMAINS[0])
    failed = await pool.fetchval("SELECT count(*) FROM mailgun.sync_runs WHERE status = 'failed'")
    assert failed > 0, "the runs of the replica with the right clock did not fail"
    assert {r["status"] for r in shown} == {"failed"}, (
        f"{failed} failed runs recorded after the last ok one, yet last_runs (what status shows) "
        f"says {sorted((r['list'], r['status']) for r in shown)}")



async def test_a_stop_during_a_claim_is_a_clean_stop(emulator, pool, database_url, tmp_path):
    """On SIGTERM the daemon stops scheduling and exits 0 with no scheduler traceback (README,
    Reliability): also when the signal comes while a claim waits on a slow schedule."""
    stderr = tmp_path / "stderr"
    async with fleet(emulator, database_url) as replicas:
        replica = await replicas.start(MAILGUN_DOMAINS=DOMAINS[0], stderr_to=stderr)
        await until_runs(pool, len(SYNCED_LISTS))
        async with pool.acquire() as db, db.transaction():
            # The schedule is slow to answer (a lock, a busy server): the next claim waits.
            await db.execute("LOCK TABLE mailgun.schedule IN ACCESS EXCLUSIVE MODE")
            await asyncio.sleep(1)
            replica.process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(replica.process.wait(), 30)
    errors = [json.loads(line) for line in stderr.read_text().splitlines()
              if json.loads(line)["level"] in ("error", "critical")]
    assert code == 0
    assert not errors, [(e["event"][:80], e.get("exception", "")[-120:]) for e in errors]


async def test_lists_run_again_once_a_read_only_or_terminated_database_is_back(emulator, pool, database_url):
    """The database going away (read-only, every connection terminated) never stops a replica
    for good: once it is back, every list runs again within about two intervals."""
    name = await pool.fetchval("SELECT current_database()")
    kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity " \
           "WHERE application_name = 'mailgun-sync' AND pid <> pg_backend_pid() AND datname = $1"
    async with fleet(emulator, database_url) as replicas:
        await replicas.start()
        await replicas.start()
        await asyncio.sleep(3)
        async with pool.acquire() as db:
            await db.execute("SET default_transaction_read_only = off")
            await db.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            try:
                for _ in range(5):
                    await db.fetch(kill, name)
                    await asyncio.sleep(1)
            finally:
                await db.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            await db.fetch(kill, name)
        back = await pool.fetchval("SELECT now()")
        await asyncio.sleep(2 * INTERVAL + CLAIM_SLACK + 1)
        until = await pool.fetchval("SELECT now()")
        alive = [r.process.returncode for r in replicas.replicas]
    starts = await run_starts(pool, back)
    missing = len(DOMAINS) * len(SYNCED_LISTS) - len(starts)
    assert alive == [None, None]
    assert missing == 0, (f"{missing} lists did not run in {(until - back).total_seconds():.1f} s "
                          "after the database came back")


async def test_a_cron_list_is_not_run_again_at_a_restart(emulator, pool, database_url):
    """A cron schedule (here once a year) runs a list new to the schedule within the jitter, and
    not again at a replica's restart, nor at a restart that changes only SYNC_JITTER."""
    cron = {"SYNC_CRON": "0 0 1 1 *", "MAILGUN_DOMAINS": DOMAINS[0]}
    async with fleet(emulator, database_url) as replicas:
        first = await replicas.start(**cron)
        await until_runs(pool, len(SYNCED_LISTS))
        await stopped(first)
        await replicas.start(**cron, SYNC_JITTER="3")
        await replicas.start(**cron)
        await asyncio.sleep(6)
    runs = await pool.fetchval("SELECT count(*) FROM mailgun.sync_runs")
    assert runs == len(SYNCED_LISTS)


async def test_a_rolling_update_to_a_shorter_interval_runs_every_list_on_the_new_one(
        emulator, pool, database_url):
    """A rolling update changing SYNC_INTERVAL (3600 s to 2 s): a list planned on a new schedule is
    due within SYNC_JITTER, and once the old replica is gone every list runs on the new interval."""
    async with fleet(emulator, database_url) as replicas:
        old = await replicas.start(SYNC_INTERVAL="3600")
        await until_runs(pool, len(DOMAINS) * len(SYNCED_LISTS))
        await replicas.start()  # the new version, beside the old one until it is ready
        await asyncio.sleep(2)
        await stopped(old)
        gone = await pool.fetchval("SELECT now()")
        await asyncio.sleep(3 * INTERVAL)
        late = await pool.fetch("SELECT domain, list, due_at - now() AS due_in FROM mailgun.schedule "
                                "WHERE due_at > now() + interval '10 seconds' ORDER BY due_at")
    starts = await run_starts(pool, gone)
    missing = len(DOMAINS) * len(SYNCED_LISTS) - len(starts)
    assert missing == 0, (f"{missing} lists not run in {3 * INTERVAL:g} s on the new interval "
                          f"of {INTERVAL:g} s; "
                          f"{len(late)} due in {late[0]['due_in'] if late else '-'} to "
                          f"{late[-1]['due_in'] if late else '-'}")


MANY = tuple(f"m{n}.many.example" for n in range(3000))


async def test_replicas_joining_beside_busy_ones_with_thousands_of_lists_all_start(
        pool, database_url, tmp_path):
    """Thousands of lists: a replica joining while others claim and renew (twice a second) plans
    its lists and takes a share; none fails to start, and the schedule's statements do not
    deadlock one another."""
    env = {"MAILGUN_DOMAINS": ",".join(MANY), "SYNC_INTERVAL": "5"}
    async with MailgunEmulator(api_key=API_KEY, domains=list(MANY)) as emulator:
        emulator.inject(Fault(action="delay", delay_s=1.0, times=None, method="GET"))
        async with fleet(emulator, database_url) as replicas:
            for _ in range(4):
                await replicas.start(**env)
            before = await pool.fetchval(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            failed = []
            for n in range(8):
                try:
                    joined = await replicas.start(**env, stderr_to=tmp_path / f"{n}")
                except AssertionError:
                    failed.append((tmp_path / f"{n}").read_text()[-400:])
                else:
                    await asyncio.sleep(0.5)
                    await stopped(joined)
            deadlocks = await pool.fetchval(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()") - before
    assert not failed and deadlocks == 0, (f"{len(failed)} of 8 replicas failed to start; "
                                           f"{deadlocks} deadlocks", failed)


async def test_domains_no_longer_synced_do_not_starve_the_lists_still_synced(emulator, pool, database_url):
    """MAILGUN_DOMAINS narrowed at a restart (or domains gone from discovery): the lists of the
    domains dropped stay in the schedule, due and unclaimed, and the lists still synced run once per
    interval (before replicas claimed only their own domains' lists: 0.17 runs per interval)."""
    async with fleet(emulator, database_url) as replicas:
        before = await replicas.start(MAILGUN_DOMAINS=",".join(DOMAINS + MANY[:50]))
        await asyncio.sleep(2)
        await stopped(before)
        await replicas.start()  # DOMAINS only
        await asyncio.sleep(3)
        since = await pool.fetchval("SELECT now()")
        await asyncio.sleep(5 * INTERVAL)
        until = await pool.fetchval("SELECT now()")
    starts = await run_starts(pool, since)
    synced = {(d, k.value) for d in DOMAINS for k in SYNCED_LISTS}
    runs = sum(len([t for t in s if t < until]) for key, s in starts.items() if key in synced)
    per_interval = runs / len(synced) / ((until - since).total_seconds() / INTERVAL)
    assert per_interval >= 0.5, (f"{per_interval:.2f} runs per synced list per interval; "
                                 f"{len(synced - set(starts))} of {len(synced)} lists not run in "
                                 f"{(until - since).total_seconds():.0f} s")


async def test_a_replica_stopped_gives_the_lists_of_its_cancelled_runs_back_at_once(
        emulator, pool, database_url):
    """SIGTERM past SHUTDOWN_GRACE: the lists of the runs it cancelled are taken by another replica
    at once (a claim's period or so), not after a lease (here 9 s)."""
    emulator.faults.clear()
    emulator.inject(Fault(action="delay", delay_s=4.0, times=None, method="GET"))
    env = {"SYNC_INTERVAL": "10", "SHUTDOWN_GRACE": "0.5", "MAILGUN_DOMAINS": ",".join(DOMAINS[:2])}
    async with fleet(emulator, database_url) as replicas:
        doomed = await replicas.start(**env)
        await asyncio.sleep(1.5)  # its runs are under way
        await replicas.start(**env)
        await stopped(doomed)
        gone = await pool.fetchval("SELECT now()")
        cancelled = {(r["domain"], r["list"]) for r in await pool.fetch(
            "SELECT domain, list FROM mailgun.sync_runs WHERE status = 'failed'")}
        await asyncio.sleep(3)
        taken = {(r["domain"], r["list"]) for r in await pool.fetch(
            "SELECT domain, list FROM mailgun.schedule WHERE claimed_at > $1", gone)}
        running = await pool.fetch("SELECT domain, list, claimed_by, due_at - now() AS due_in "
                                   "FROM mailgun.schedule ORDER BY due_at")
    assert cancelled, "no run was cancelled"
    assert cancelled <= taken, (f"{len(cancelled - taken)} of {len(cancelled)} cancelled lists not taken "
                                f"within 3 s: {[(r['list'], r['due_in']) for r in running]}")
