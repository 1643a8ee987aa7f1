"""For any remote list and any mirror, one run brings both sides in step, and a second run changes
nothing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.account import DOMAIN
from tests.support.mirror import empty_mirror, insert_row, rows
from worker.records import SuppressionList, address_problem

# 30 examples, each a mirror and a list reconciled twice: seconds.
pytestmark = pytest.mark.slow

BOUNCES = SuppressionList.BOUNCES
UNSUBSCRIBES = SuppressionList.UNSUBSCRIBES
AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)

ADDRESSES = [f"person{i}@example.com" for i in range(8)] + ["Person1@Example.com", "no-at-sign"]
CODES = st.sampled_from(["550", "551", "554"])
TAGS = st.lists(st.sampled_from(["*", "news", "promo", "billing"]), min_size=1, max_size=3, unique=True)

remote_lists = st.dictionaries(st.sampled_from(ADDRESSES[:8]), st.tuples(CODES, TAGS), max_size=8)
local_rows = st.dictionaries(
    st.sampled_from(ADDRESSES),
    st.tuples(st.sampled_from(["pending", "synced", "rejected"]), CODES, TAGS),
    max_size=10,
).filter(lambda found: len({a.lower() for a in found}) == len(found))


def remote_record(kind: SuppressionList, address: str, code: str, tags: list[str]) -> dict[str, object]:
    if kind is BOUNCES:
        return {"address": address, "code": code}
    return {"address": address, "tags": tags}


def data(kind: SuppressionList, record: dict[str, object]) -> object:
    return record["code"] if kind is BOUNCES else sorted(record["tags"])  # type: ignore[call-overload]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from([BOUNCES, UNSUBSCRIBES]), remote=remote_lists, local=local_rows)
async def test_one_run_converges_and_a_second_changes_nothing(pool, emulator, make_reconciler,
                                                              kind, remote, local):
    emulator.reset()
    emulator.declare(DOMAIN)
    await empty_mirror(pool)
    emulator.seed(DOMAIN, kind, [remote_record(kind, a, code, tags) for a, (code, tags) in remote.items()])
    for address, (state, code, tags) in local.items():
        fields = {"code": code} if kind is BOUNCES else {"tags": tags}
        await insert_row(pool, kind, DOMAIN, address, state=state,
                         synced_at=AN_HOUR_AGO if state == "synced" else None, **fields)
    remote_before = {r["address"].lower() for r in emulator.records(DOMAIN, kind)}
    reconciler = make_reconciler(allow_mass_delete=True)

    first = await reconciler.reconcile(uuid.uuid4(), DOMAIN, kind)

    assert first.status == "ok", first.error
    remote_after = {r["address"].lower(): r for r in emulator.records(DOMAIN, kind)}
    mirror = {a.lower(): row for a, row in (await rows(pool, kind)).items()}
    synced = {key for key, row in mirror.items() if row["sync_state"] == "synced"}
    # Mailgun lost nothing, and learned every valid local addition.
    assert remote_before <= set(remote_after)
    for address, (state, _, _) in local.items():
        if state == "pending" and address_problem(address) is None:
            assert address.lower() in remote_after
    # The synced part of the mirror is exactly Mailgun's list, field for field.
    assert synced == set(remote_after)
    for key in synced:
        assert data(kind, dict(mirror[key])) == data(kind, remote_after[key])
    # Anything else is a refused row that Mailgun does not have.
    for key in set(mirror) - synced:
        assert mirror[key]["sync_state"] == "rejected"
        assert key not in remote_after

    second = await reconciler.reconcile(uuid.uuid4(), DOMAIN, kind)
    assert second.changes() == 0, second
