"""Whatever Mailgun does wrong during a run, the run loses nothing, and the next run brings both
sides in step: every local addition reaches Mailgun once, the mirror holds exactly Mailgun's list."""

from __future__ import annotations

import collections
import uuid

import pytest

from tests.support.account import API_KEY, DOMAIN
from tests.support.mirror import rows
from worker.devtools.sql import queries
from worker.emulator import Fault
from worker.mailgun.retry import RetryPolicy
from worker.records import SuppressionList

BOUNCES = SuppressionList.BOUNCES
N, PENDING = 400, 25


def fault(action: str = "status", **options: object) -> Fault:
    return Fault(action=action, **options)  # type: ignore[arg-type]


FAULTS = {
    "5xx burst on pages": fault(status=503, times=3, method="GET"),
    "5xx until the retries run out": fault(status=500, times=8, method="GET", page="next"),
    "429 storm with a budget reset": fault(status=429, times=5, reset_in_ms=50),
    "429 with Retry-After": fault(status=429, times=2, retry_after="1"),
    "timeouts": fault("delay", delay_s=1.5, times=2, method="GET"),
    "slow body": fault("slow_body", delay_s=0.2, times=1, method="GET", page="next"),
    "connection reset mid-page": fault("reset", times=2, method="GET", page="next"),
    "connection reset mid-push": fault("reset", times=1, method="POST"),
    "dropped connection on push": fault("drop", times=2, method="POST"),
    "5xx on push": fault(status=502, times=9, method="POST"),
    "malformed JSON": fault("malformed_json", times=2, page="next"),
    "truncated JSON": fault("truncated_json", times=1),
    "body not UTF-8": fault("invalid_utf8", times=5, page="next"),
    "page far larger than asked": fault("oversized", size_bytes=3_000_000, times=1, page="next"),
    "items null mid-list": fault("items_null", times=1, page="next", skip=2),
    "next on another origin": fault("foreign_next", times=1),
    "next that repeats forever": fault("repeat_next", times=None, page="next"),
    "cursor going backwards": fault("backwards_next", times=1, page="next"),
    "overlapping pages": fault("overlap", times=3, page="next"),
    "key rotated mid-run": fault(status=401, times=None, method="POST"),
    "domain unknown": fault(status=404, times=None, message=f"Domain not found: {DOMAIN}"),
}


async def arrange(pool, emulator) -> None:
    """Mailgun has N bounces; the mirror lacks 1 in 100, has N/100 Mailgun lost, and PENDING
    local additions."""
    emulator.generate(DOMAIN, BOUNCES, N)
    await pool.execute(queries()["bench_prepare_mirror"], DOMAIN, N, PENDING)


# The timeouts are waited out for real, a second each.
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name == "timeouts" else name
                                  for name in FAULTS])
async def test_a_fault_loses_nothing_and_the_next_run_converges(
        name, pool, emulator, make_client, make_reconciler, sleeps):
    await arrange(pool, emulator)
    pending = {a for a, r in (await rows(pool, BOUNCES)).items() if r["sync_state"] == "pending"}
    client = make_client(page_limit=50, timeout=1.0, max_response_bytes=1_000_000,
                         retry=RetryPolicy(max_attempts=4, backoff_max=0.05, sleep=sleeps))
    emulator.inject(FAULTS[name])

    first = await make_reconciler(client=client).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    mirror = await rows(pool, BOUNCES)
    remote = {r["address"] for r in emulator.records(DOMAIN, BOUNCES)}
    # Nothing lost: every pending row is either still pending or on Mailgun, and nothing Mailgun
    # has was removed from the mirror unless the run completed.
    for address in pending:
        assert mirror[address]["sync_state"] == "pending" or address in remote
    if first.status != "ok":
        assert first.error
        if first.error.startswith("pull incomplete"):
            assert (first.removed, first.inserted, first.pushed) == (0, 0, 0)

    emulator.faults.clear()
    second = await make_reconciler(client=client).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert second.status == "ok", second.error
    mirror = await rows(pool, BOUNCES)
    remote_records = emulator.records(DOMAIN, BOUNCES)
    remote = {r["address"] for r in remote_records}
    assert set(mirror) == remote
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}
    assert pending <= remote
    assert len(remote_records) == N + PENDING
    # A batch may be sent again after a reset (Mailgun's add is an upsert), never a record twice
    # in one batch, and never more often than there were attempts.
    sent = collections.Counter(item["address"] for r in emulator.requests if r.method == "POST"
                               and r.status == 200 for item in r.json())
    assert max(sent.values(), default=1) <= 2
    assert API_KEY not in str(first.error)
