"""PostgreSQL going away or refusing writes: a clear error, nothing half-applied, and the next run
converges. (A server restart looks the same to the worker as its connections being terminated,
which is what these tests do; the server itself is shared by the whole test run.)"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from tests.conftest import DOMAIN
from tests.support.mirror import rows
from worker.devtools.sql import queries
from worker.emulator import Fault
from worker.migrate import migrate
from worker.reconcile import ReconcileOptions, Reconciler
from worker.records import SuppressionList
from worker.store import MirrorStore, open_pool

BOUNCES = SuppressionList.BOUNCES
N, PENDING = 300, 20

# Only this test's database: other databases on the server (another test run) are left alone.
LOCK_HOLDERS = ("SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND l.pid <> pg_backend_pid() "
                "AND d.datname = current_database()")


async def arrange(pool, emulator) -> None:
    emulator.generate(DOMAIN, BOUNCES, N)
    await pool.execute(queries()["bench_prepare_mirror"], DOMAIN, N, PENDING)


async def terminate_lock_holders(pool) -> int:
    pids = [r["pid"] for r in await pool.fetch(LOCK_HOLDERS)]
    for pid in pids:
        await pool.execute("SELECT pg_terminate_backend($1)", pid)
    return len(pids)


async def converges(pool, emulator, make_reconciler) -> None:
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert result.status == "ok", result.error
    mirror = await rows(pool, BOUNCES)
    assert set(mirror) == {r["address"] for r in emulator.records(DOMAIN, BOUNCES)}
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}
    assert len(mirror) == N + PENDING


async def kill_during(pool, emulator, make_reconciler, method: str) -> None:
    emulator.inject(Fault(action="delay", delay_s=0.5, times=1, method=method))
    running = asyncio.create_task(make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES))
    deadline = asyncio.get_running_loop().time() + 10
    while not [r for r in emulator.requests if r.method == method]:
        assert asyncio.get_running_loop().time() < deadline, f"no {method} reached Mailgun"
        await asyncio.sleep(0.01)
    assert await terminate_lock_holders(pool) == 1
    result = await running
    assert result.status == "failed"
    assert "PostgreSQL" in str(result.error)


async def test_connection_killed_mid_pull_changes_nothing_then_converges(pool, emulator, make_reconciler):
    await arrange(pool, emulator)
    before = await rows(pool, BOUNCES)
    await kill_during(pool, emulator, make_reconciler, "GET")
    assert await rows(pool, BOUNCES) == before
    await converges(pool, emulator, make_reconciler)


async def test_connection_killed_mid_push_keeps_rows_pending_then_converges(pool, emulator, make_reconciler):
    await arrange(pool, emulator)
    await kill_during(pool, emulator, make_reconciler, "POST")
    pending = [a for a, r in (await rows(pool, BOUNCES)).items() if r["sync_state"] == "pending"]
    assert len(pending) == PENDING  # Mailgun may have them, but nothing confirmed them here
    await converges(pool, emulator, make_reconciler)


async def test_a_lock_left_by_a_dead_process_is_released(pool, database_url, emulator, make_reconciler):
    await arrange(pool, emulator)
    holder = await asyncpg.connect(database_url)
    assert await holder.fetchval(queries()["try_lock_list"], DOMAIN, "bounces")
    skipped = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert skipped.status == "skipped"
    await pool.execute("SELECT pg_terminate_backend($1)", holder.get_server_pid())
    await holder.close()
    await converges(pool, emulator, make_reconciler)


async def test_a_read_only_database_is_a_clear_error_and_changes_nothing(
        empty_database_url, emulator, client):
    async with open_pool(empty_database_url) as setup:
        await migrate(setup)
        await arrange(setup, emulator)
        before = await rows(setup, BOUNCES)
        name = await setup.fetchval("SELECT current_database()")
        await setup.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    async with open_pool(empty_database_url) as pool:
        result = await Reconciler(MirrorStore(pool), client, ReconcileOptions()).reconcile(
            uuid.uuid4(), DOMAIN, BOUNCES)
        assert result.status == "failed"
        assert "read-only transaction" in str(result.error)
        assert str(result.error).startswith("PostgreSQL failed while")
        assert await rows(pool, BOUNCES) == before
        assert not [r for r in emulator.requests if r.method == "POST"]
