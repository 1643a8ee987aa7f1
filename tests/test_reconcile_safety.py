"""Never lose data: partial pulls, the deletion guard, dry runs, concurrent runs and a killed run."""

from __future__ import annotations

import asyncio
import collections
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.support.account import DOMAIN
from tests.support.mirror import insert_row, rows, snapshot
from tests.support.process import run_killed_once
from worker.emulator import Fault
from worker.records import SuppressionList, parse_timestamp

BOUNCES = SuppressionList.BOUNCES
AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)
CREATED = "Fri, 02 Jan 2026 03:04:05 UTC"


def addresses(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:05}@example.com" for i in range(count)]


async def seed_synced(pool, emulator, count: int) -> list[str]:
    """A list both sides agree on."""
    found = addresses("both", count)
    emulator.seed(DOMAIN, BOUNCES, [{"address": a, "created_at": CREATED} for a in found])
    await pool.executemany(
        "INSERT INTO mailgun.bounces (domain, address, created_at, sync_state, synced_at)"
        " VALUES ($1, $2, $3, 'synced', $4)",
        [(DOMAIN, a, parse_timestamp(CREATED), AN_HOUR_AGO) for a in found])
    return found


def posted_addresses(emulator) -> list[str]:
    return [item["address"] for r in emulator.requests if r.method == "POST" for item in r.json()]


async def test_partial_pull_removes_nothing_and_pushes_nothing(pool, emulator, make_client, make_reconciler):
    await seed_synced(pool, emulator, 250)
    await insert_row(pool, BOUNCES, DOMAIN, "pending@example.com")
    emulator.fail_next(503, times=None, page="next", skip=1)  # the third page never comes
    reconciler = make_reconciler(client=make_client(page_limit=100))
    before = await snapshot(pool)

    result = await reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert result.status == "failed"
    assert "pull incomplete, nothing changed" in str(result.error)
    after = await snapshot(pool)
    assert after["bounces"] == before["bounces"]
    assert posted_addresses(emulator) == []
    [run] = after["sync_runs"]
    assert run[4] == "failed"


async def test_deletion_guard_removes_nothing_when_too_much_would_go(pool, emulator, make_reconciler):
    kept = await seed_synced(pool, emulator, 100)
    for address in kept[:20]:
        emulator.remove(DOMAIN, BOUNCES, address)
    emulator.seed(DOMAIN, BOUNCES, [{"address": "fresh@example.com"}])

    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert result.status == "guarded"
    assert not result.succeeded
    assert "would remove 20 of 100" in str(result.error)
    assert (result.removed, result.inserted) == (0, 1)
    assert len(await rows(pool, BOUNCES)) == 101


async def test_allow_mass_delete_lets_the_guarded_removal_through(pool, emulator, make_reconciler):
    kept = await seed_synced(pool, emulator, 100)
    for address in kept[:20]:
        emulator.remove(DOMAIN, BOUNCES, address)
    result = await make_reconciler(allow_mass_delete=True).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (result.status, result.removed) == ("ok", 20)
    assert len(await rows(pool, BOUNCES)) == 80


async def test_guard_ignores_small_removals_and_respects_the_fraction(pool, emulator, make_reconciler):
    kept = await seed_synced(pool, emulator, 30)
    for address in kept[:10]:  # a third of the list, but only 10 rows
        emulator.remove(DOMAIN, BOUNCES, address)
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (result.status, result.removed) == ("ok", 10)
    for address in kept[10:22]:  # 12 of the 20 left: over 10 rows, under a 0.7 fraction
        emulator.remove(DOMAIN, BOUNCES, address)
    result = await make_reconciler(max_delete_fraction=0.7).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (result.status, result.removed) == ("ok", 12)


async def test_dry_run_changes_neither_side(pool, emulator, make_reconciler):
    kept = await seed_synced(pool, emulator, 40)
    emulator.remove(DOMAIN, BOUNCES, kept[0])
    emulator.seed(DOMAIN, BOUNCES, [{"address": "remote-only@example.com"},
                                    {"address": kept[1], "code": "554"}])
    await insert_row(pool, BOUNCES, DOMAIN, "local-only@example.com")
    mirror_before, remote_before = await snapshot(pool), emulator.records(DOMAIN, BOUNCES)

    result = await make_reconciler(dry_run=True).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (result.inserted, result.updated, result.removed, result.pushed) == (1, 1, 1, 1)
    assert await snapshot(pool) == mirror_before
    assert emulator.records(DOMAIN, BOUNCES) == remote_before
    assert {r.method for r in emulator.requests} == {"GET"}


async def test_two_concurrent_runs_push_no_record_twice(pool, emulator, make_reconciler):
    local = addresses("local", 3000)
    await pool.executemany("INSERT INTO mailgun.bounces (domain, address) VALUES ($1, $2)",
                           [(DOMAIN, a) for a in local])
    emulator.inject(Fault(action="delay", delay_s=0.05, times=None, method="POST"))

    first, second = await asyncio.gather(
        make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES),
        make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES))

    assert {first.status, second.status} <= {"ok", "skipped"}
    assert first.pushed + second.pushed == 3000
    counts = collections.Counter(posted_addresses(emulator))
    assert set(counts) == set(local)
    assert max(counts.values()) == 1


@pytest.mark.slow
async def test_a_run_killed_mid_push_converges_on_the_next_run(pool, emulator, database_url, make_reconciler):
    local = addresses("local", 2500)
    await pool.executemany("INSERT INTO mailgun.bounces (domain, address) VALUES ($1, $2)",
                           [(DOMAIN, a) for a in local])
    # The first batch goes through; the others fail until the worker is killed in its retry waits.
    emulator.fail_next(503, times=None, method="POST", skip=1)
    await run_killed_once(emulator, database_url, lambda r: r.method == "POST" and r.status == 200)
    emulator.faults.clear()
    remote_after_kill = {r["address"] for r in emulator.records(DOMAIN, BOUNCES)}
    assert len(remote_after_kill) == 1000
    marked_before_kill = sum(r["sync_state"] == "synced" for r in (await rows(pool, BOUNCES)).values())
    cut = len(emulator.requests)

    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (result.status, result.pushed) == ("ok", 1500)
    assert result.adopted == 1000 - marked_before_kill
    mirror = await rows(pool, BOUNCES)
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}
    assert {r["address"] for r in emulator.records(DOMAIN, BOUNCES)} == set(local)
    # What Mailgun had confirmed before the kill was adopted, not sent again.
    resent = {item["address"] for r in list(emulator.requests)[cut:] if r.method == "POST"
              for item in r.json()}
    assert resent == set(local) - remote_after_kill


async def test_two_workers_with_different_settings_push_nothing_twice(pool, emulator, make_client,
                                                                      make_reconciler):
    local = addresses("local", 1500)
    await pool.executemany("INSERT INTO mailgun.bounces (domain, address) VALUES ($1, $2)",
                           [(DOMAIN, a) for a in local])
    await seed_synced(pool, emulator, 3000)
    emulator.inject(Fault(action="delay", delay_s=0.02, times=None))
    eager = make_reconciler(client=make_client(page_limit=100, push_concurrency=8), pull_ranges=4,
                            max_delete_fraction=0.5)
    cautious = make_reconciler(client=make_client(page_limit=1000, push_concurrency=1), pull_ranges=1,
                               max_delete_fraction=0.0, push_batch_size=100)

    results = await asyncio.gather(*(worker.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
                                     for worker in (eager, cautious, eager, cautious)))

    assert {r.status for r in results} <= {"ok", "skipped"}
    assert sum(r.pushed for r in results) == 1500
    counts = collections.Counter(posted_addresses(emulator))
    assert set(counts) == set(local)
    assert max(counts.values()) == 1


async def test_items_null_mid_list_and_an_empty_last_page_remove_nothing(pool, emulator, make_client,
                                                                         make_reconciler):
    await seed_synced(pool, emulator, 30)
    before = await snapshot(pool)
    # The second page and the last page both come back `items: null`: read as an end, the rows
    # after the first page would be removed (3 of 30, under the deletion guard).
    emulator.inject(Fault(action="items_null", page="next", skip=8))
    emulator.inject(Fault(action="items_null", page="last"))

    result = await make_reconciler(client=make_client(page_limit=9)).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert result.status == "failed"
    assert "the list's last page is empty" in str(result.error)
    assert (result.removed, result.inserted, result.updated) == (0, 0, 0)
    assert {k: v for k, v in (await snapshot(pool)).items() if k != "sync_runs"} == \
        {k: v for k, v in before.items() if k != "sync_runs"}


async def test_an_empty_first_page_does_not_wipe_a_small_list(pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"few{i}@example.com"} for i in range(8)])
    first = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert first.inserted == 8
    emulator.inject(Fault(action="items_null", page=""))
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (result.status, result.removed) == ("failed", 0)
    assert len(await rows(pool, BOUNCES)) == 8
