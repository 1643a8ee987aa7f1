"""Three daemon replicas and a CronJob-style `run` against one database at once: every list ends
in step, no list is ever reconciled by two processes at once, and no record is pushed twice."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys

import pytest

from tests.support.account import API_KEY, DOMAIN
from worker.emulator import Fault
from worker.records import SYNCED_LISTS

# Daemons and a run as child processes.
pytestmark = pytest.mark.slow

# The lists Mailgun takes in batches; the allowlist (one form post per entry) is reconciled too,
# but empty here.
BATCHED = [kind for kind in SYNCED_LISTS if kind.accepts_batches]
OTHER_DOMAIN = "mg.example.org"
DOMAINS = (DOMAIN, OTHER_DOMAIN)


async def test_three_daemons_and_a_run_share_the_lists_safely(emulator, pool, database_url):
    emulator.declare(OTHER_DOMAIN)
    for domain in DOMAINS:
        for kind in BATCHED:
            emulator.seed(domain, kind, [{"address": f"remote{i}@{kind.value}.example.com"}
                                         for i in range(200)])
            await pool.executemany(
                f"INSERT INTO mailgun.{kind.value} (domain, address) VALUES ($1, $2)",
                [(domain, f"local{i}@{kind.value}.example.com") for i in range(300)])
    # Slow answers keep runs in progress long enough for the processes to contend for locks.
    emulator.inject(Fault(action="delay", delay_s=0.05, times=None))
    env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
           "MAILGUN_DOMAINS": ",".join(DOMAINS), "DATABASE_URL": database_url,
           "HTTP_PORT": "0", "SYNC_INTERVAL": "1", "SYNC_JITTER": "0.5"}

    def start(*args: str) -> asyncio.Future[asyncio.subprocess.Process]:
        return asyncio.ensure_future(asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", *args, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))

    daemons = [await start("daemon") for _ in range(3)]
    once = await start("run")
    assert await asyncio.wait_for(once.wait(), 60) in (0, 1)
    await asyncio.sleep(4)
    for daemon in daemons:
        daemon.send_signal(signal.SIGTERM)
    codes = [await asyncio.wait_for(d.wait(), 30) for d in daemons]
    assert codes == [0, 0, 0]

    # Every list is in step on both sides.
    for domain in DOMAINS:
        for kind in BATCHED:
            remote = {r["address"] for r in emulator.records(domain, kind)}
            mirror = await pool.fetch(
                f"SELECT address, sync_state FROM mailgun.{kind.value} WHERE domain = $1", domain)
            assert {r["address"] for r in mirror} == remote
            assert {r["sync_state"] for r in mirror} == {"synced"}
            assert len(remote) == 500
    # Runs of one list never overlapped in time.
    runs = await pool.fetch("SELECT domain, list, started_at, finished_at FROM mailgun.sync_runs "
                            "ORDER BY domain, list, started_at")
    assert len(runs) >= 2 * len(SYNCED_LISTS)
    previous: dict[tuple[str, str], object] = {}
    for run in runs:
        key = (run["domain"], run["list"])
        if key in previous:
            assert run["started_at"] >= previous[key], f"two runs of {key} overlapped"
        previous[key] = run["finished_at"]
    # Nothing was pushed twice.
    pushed = collections.Counter(
        (r.path, item["address"]) for r in emulator.requests if r.method == "POST" for item in r.json())
    assert len(pushed) == 2 * 3 * 300
    assert max(pushed.values()) == 1
