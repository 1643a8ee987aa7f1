"""Daemon replicas on one database share the lists instead of repeating them: each list is
reconciled once per interval however many replicas run, a replica that dies hands its lists over
within an interval, and one that joins takes a share at once. Real processes throughout."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.replicas import Fleet, Replica, run_starts, slow_emulator
from tests.support.replicas import fleet as replicas_fleet
from worker.emulator import MailgunEmulator
from worker.records import SYNCED_LISTS

pytestmark = pytest.mark.slow  # real daemon processes, for seconds

DOMAINS = tuple(f"mg{n}.replicas.example" for n in range(5))  # 20 lists
INTERVAL = 2.0
# A list due is claimed within a second (CLAIM_EVERY), then started.
CLAIM_SLACK = 1.5


@pytest.fixture
async def emulator() -> AsyncIterator[MailgunEmulator]:
    async with slow_emulator(DOMAINS) as running:
        yield running


def fleet(emulator: MailgunEmulator, database_url: str) -> contextlib.AbstractAsyncContextManager[Fleet]:
    return replicas_fleet(emulator, database_url, domains=DOMAINS, interval=INTERVAL)


async def runs_of(replica: Replica) -> float:
    """How many runs this replica has made, from its /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"{replica.http}/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mailgun_sync_runs_total{"))


async def test_three_replicas_reconcile_each_list_once_per_interval(emulator, pool, database_url):
    async with fleet(emulator, database_url) as replicas:
        for _ in range(3):
            await replicas.start()
        await asyncio.sleep(3)  # the first runs, spread over the jitter
        since = await pool.fetchval("SELECT now()")
        await asyncio.sleep(5 * INTERVAL)
        until = await pool.fetchval("SELECT now()")
        shares = [await runs_of(r) for r in replicas.replicas]

    starts = await run_starts(pool, since)
    lists = len(DOMAINS) * len(SYNCED_LISTS)
    intervals = (until - since).total_seconds() / INTERVAL
    runs = sum(len([t for t in s if t < until]) for s in starts.values())
    assert len(starts) == lists
    # Each replica on its own would run every list every interval: three times as many.
    assert runs / lists / intervals <= 1.1
    assert runs / lists / intervals >= 0.7
    assert all(share > 0 for share in shares), shares


async def test_a_replica_killed_hands_its_lists_over_within_an_interval(emulator, pool, database_url):
    async with fleet(emulator, database_url) as replicas:
        doomed = await replicas.start()
        await replicas.start()
        await asyncio.sleep(3)
        for _ in range(200):  # until runs are in progress: the doomed replica holds claims
            if await pool.fetchval("SELECT count(*) FROM mailgun.schedule WHERE claimed_by IS NOT NULL"):
                break
            await asyncio.sleep(0.05)
        killed = await pool.fetchval("SELECT now()")
        doomed.process.kill()
        await asyncio.sleep(4 * INTERVAL)
        until = await pool.fetchval("SELECT now()")

    starts = await run_starts(pool, killed - (until - killed))
    assert len(starts) == len(DOMAINS) * len(SYNCED_LISTS)
    longest = 0.0
    for times in starts.values():
        after = [t for t in times if t < until]
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(after)]
        gaps.append((until - after[-1]).total_seconds())
        longest = max(longest, *gaps)
    # A list whose run the kill cut short is taken when its claim runs out, a lease (the
    # interval) after it was claimed: no list goes two intervals without a run.
    assert longest <= 2 * INTERVAL + CLAIM_SLACK


async def test_a_replica_that_joins_takes_a_share_at_once(emulator, pool, database_url):
    async with fleet(emulator, database_url) as replicas:
        first = await replicas.start()
        await asyncio.sleep(3)
        joined = await replicas.start()
        since = await pool.fetchval("SELECT now()")
        await asyncio.sleep(2 * INTERVAL + CLAIM_SLACK)
        until = await pool.fetchval("SELECT now()")
        mine, theirs = await runs_of(joined), await runs_of(first)

    lists = len(DOMAINS) * len(SYNCED_LISTS)
    # Within two intervals of its start it has run a good part of the lists, and the pair
    # still runs each list about once an interval.
    assert mine >= lists / 4, (mine, theirs)
    starts = await run_starts(pool, since)
    runs = sum(len([t for t in s if t < until]) for s in starts.values())
    assert runs / lists / ((until - since).total_seconds() / INTERVAL) <= 1.2
