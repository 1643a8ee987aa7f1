"""A worker killed (SIGKILL) anywhere in a run: the next run converges, and a batch Mailgun stored
before the kill is adopted, not sent again."""

from __future__ import annotations

import asyncio
import collections
import uuid

import pytest

from tests.support.account import DOMAIN
from tests.support.mirror import rows
from tests.support.process import run_killed_once
from worker.devtools.sql import queries
from worker.emulator import Fault
from worker.records import SuppressionList

# Each test kills `mailgun-sync run` as a child process.
pytestmark = pytest.mark.slow

BOUNCES = SuppressionList.BOUNCES
N, PENDING = 2000, 300

KILL_POINTS = {
    # where the worker is when it is killed: the request Mailgun is holding at that moment
    "pulling": Fault(action="delay", delay_s=30, method="GET", page="next"),
    "pushing, before Mailgun stored the batch": Fault(action="delay", delay_s=30, method="POST"),
    "pushing, after Mailgun stored the batch": Fault(action="delay_after", delay_s=30, method="POST"),
}


@pytest.mark.parametrize("point", KILL_POINTS)
async def test_a_run_killed_anywhere_converges_on_the_next(point, pool, emulator, database_url,
                                                           make_reconciler):
    emulator.generate(DOMAIN, BOUNCES, N)
    await pool.execute(queries()["bench_prepare_mirror"], DOMAIN, N, PENDING)
    emulator.inject(KILL_POINTS[point])
    method = KILL_POINTS[point].method
    await run_killed_once(emulator, database_url, lambda r: r.method == method and r.status is None,
                          then=0.1 if point.endswith("stored the batch") else 0)
    deadline = asyncio.get_running_loop().time() + 20
    emulator.faults.clear()
    # PostgreSQL ends the dead worker's session, and with it the list's lock, as soon as it
    # notices the closed connection.
    while await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"):
        assert asyncio.get_running_loop().time() < deadline, "the dead worker's lock was never released"
        await asyncio.sleep(0.02)
    stored_before = {r["address"] for r in emulator.records(DOMAIN, BOUNCES)}
    cut = len(emulator.requests)

    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert result.status == "ok", result.error
    mirror = await rows(pool, BOUNCES)
    remote = {r["address"] for r in emulator.records(DOMAIN, BOUNCES)}
    assert set(mirror) == remote
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}
    assert len(remote) == N + PENDING
    resent = collections.Counter(item["address"] for r in list(emulator.requests)[cut:]
                                 if r.method == "POST" for item in r.json())
    assert not set(resent) & stored_before
