"""Large lists are pulled in parallel keyset ranges; the result is the same as one pager's, and a range
that ends early removes nothing."""

from __future__ import annotations

import uuid

import pytest
from structlog.testing import capture_logs

from tests.support.account import DOMAIN
from tests.support.mirror import rows
from worker.devtools.sql import queries
from worker.emulator import EmulatorSettings, Fault
from worker.records import SuppressionList

BOUNCES = SuppressionList.BOUNCES
N = 12_000


async def prepare(pool, emulator, pending: int = 50) -> None:
    """Mailgun has N synthetic bounces; the mirror lacks 1 in 100 of them, has N/100 that Mailgun
    lost, and `pending` local additions."""
    emulator.generate(DOMAIN, BOUNCES, N)
    await pool.execute(queries()["bench_prepare_mirror"], DOMAIN, N, pending)


async def test_a_large_list_is_pulled_in_ranges_with_the_same_result(pool, emulator, make_client,
                                                                      make_reconciler):
    await prepare(pool, emulator)
    reconciler = make_reconciler(client=make_client(page_limit=500), pull_ranges=4)

    result = await reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (result.status, result.pulled) == ("ok", N)
    assert (result.inserted, result.removed, result.pushed) == (N // 100, N // 100, 50)
    firsts = [r for r in emulator.requests if r.method == "GET" and "page" not in r.query]
    assert len(firsts) == 1  # only the first range starts at the top of the list
    mirror = await rows(pool, BOUNCES)
    remote = {r["address"] for r in emulator.records(DOMAIN, BOUNCES)}
    assert set(mirror) == remote
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}


@pytest.mark.parametrize("emulator_settings", [EmulatorSettings(case_sensitive=False)])
async def test_ranges_fall_back_to_one_pager_when_the_order_is_not_code_point(
        pool, emulator, make_client, make_reconciler):
    await prepare(pool, emulator, pending=0)
    # Case-folding order puts "Zed" after "user...", code-point order before: ranges see it.
    emulator.seed(DOMAIN, BOUNCES, [{"address": "Zed@example.com"}, {"address": "zoe@example.com"}])
    reconciler = make_reconciler(client=make_client(page_limit=500), pull_ranges=4)

    with capture_logs() as logs:
        result = await reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert any(entry["event"] == "ranges_abandoned" for entry in logs)
    assert (result.status, result.pulled) == ("ok", N + 2)
    mirror = await rows(pool, BOUNCES)
    assert set(mirror) == {r["address"] for r in emulator.records(DOMAIN, BOUNCES)}


async def test_an_empty_page_in_a_middle_range_removes_nothing(pool, emulator, make_client, make_reconciler):
    emulator.generate(DOMAIN, BOUNCES, 12_000)
    await pool.execute(queries()["bench_prepare_mirror"], DOMAIN, 12_000, 0)
    emulator.inject(Fault(action="items_null", page="next", skip=9))
    reconciler = make_reconciler(client=make_client(page_limit=500), pull_ranges=4)

    result = await reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (result.status, result.removed) == ("failed", 0)
    assert "the pull is incomplete" in str(result.error)
    again = await reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert again.status == "ok"
    assert len(await rows(pool, BOUNCES)) == 12_000
