"""The allowlist (Mailgun's `whitelists`): mirrored like the other lists, with its own shape:
`type` address or domain, `value`, `reason`, and one form post per local addition."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from tests.support.account import DOMAIN
from tests.support.mirror import changes, insert_row, rows
from worker.records import SuppressionList

ALLOWLIST = SuppressionList.ALLOWLIST
AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)


async def run(make_reconciler, **options):
    return await make_reconciler(**options).reconcile(uuid.uuid4(), DOMAIN, ALLOWLIST)


def posts(emulator) -> list[dict[str, str]]:
    return [r.form() for r in emulator.requests if r.method == "POST"]


async def test_mailguns_allowlist_is_mirrored_with_type_reason_and_created_at(
        pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, ALLOWLIST, [
        {"value": "ceo@example.com", "type": "address", "reason": "never block the CEO",
         "createdAt": "Fri, 21 Oct 2011 11:02:55 UTC"},
        {"value": "partner.example.org", "type": "domain", "reason": "",
         "createdAt": "Sat, 22 Oct 2011 09:00:00 UTC"},
    ])

    result = await run(make_reconciler)

    assert (result.status, result.list, result.pulled, result.inserted) == ("ok", "allowlist", 2, 2)
    mirror = await rows(pool, ALLOWLIST)
    assert {v: (r["type"], r["reason"], r["created_at"], r["sync_state"]) for v, r in mirror.items()} == {
        "ceo@example.com": ("address", "never block the CEO", datetime(2011, 10, 21, 11, 2, 55, tzinfo=UTC),
                            "synced"),
        "partner.example.org": ("domain", "", datetime(2011, 10, 22, 9, tzinfo=UTC), "synced"),
    }
    assert ("allowlist", "ceo@example.com", "insert") in await changes(pool)
    assert (await run(make_reconciler)).inserted == 0


async def test_local_entries_are_pushed_one_form_post_each_address_or_domain(
        pool, emulator, make_reconciler):
    await insert_row(pool, ALLOWLIST, DOMAIN, "vip@example.com", reason="biggest customer")
    await insert_row(pool, ALLOWLIST, DOMAIN, "trusted.example.net", type="domain")

    result = await run(make_reconciler)

    assert (result.status, result.pushed) == ("ok", 2)
    assert sorted(posts(emulator), key=str) == [
        {"address": "vip@example.com", "reason": "biggest customer"},
        {"domain": "trusted.example.net"},
    ]
    assert {(r["value"], r["type"]) for r in emulator.records(DOMAIN, ALLOWLIST)} == {
        ("vip@example.com", "address"), ("trusted.example.net", "domain")}
    assert {r["sync_state"] for r in (await rows(pool, ALLOWLIST)).values()} == {"synced"}


async def test_the_next_run_takes_mailguns_created_at_and_then_changes_nothing(
        pool, emulator, make_reconciler):
    """Mailgun's allowlist add takes no timestamp: it stamps the entry itself."""
    await insert_row(pool, ALLOWLIST, DOMAIN, "vip@example.com", created_at=datetime(2020, 1, 1, tzinfo=UTC))
    assert (await run(make_reconciler)).pushed == 1

    second = await run(make_reconciler)
    third = await run(make_reconciler)

    assert (second.updated, third.updated, third.pushed, third.inserted) == (1, 0, 0, 0)
    [remote] = emulator.records(DOMAIN, ALLOWLIST)
    mirror = (await rows(pool, ALLOWLIST))["vip@example.com"]
    assert mirror["created_at"].strftime("%a, %d %b %Y %H:%M:%S UTC") == remote["createdAt"]


async def test_an_invalid_address_or_domain_is_rejected_locally_and_never_sent(
        pool, emulator, make_reconciler):
    await insert_row(pool, ALLOWLIST, DOMAIN, "not an address")
    await insert_row(pool, ALLOWLIST, DOMAIN, "no_such..domain", type="domain")
    await insert_row(pool, ALLOWLIST, DOMAIN, "fine.example.com", type="domain")

    result = await run(make_reconciler)

    assert (result.pushed, result.rejected) == (1, 2)
    mirror = await rows(pool, ALLOWLIST)
    assert mirror["not an address"]["sync_error"].startswith("invalid address")
    assert mirror["no_such..domain"]["sync_error"].startswith("invalid domain")
    assert posts(emulator) == [{"domain": "fine.example.com"}]


async def test_a_type_other_than_address_or_domain_is_refused_by_the_table(pool):
    try:
        await insert_row(pool, ALLOWLIST, DOMAIN, "x@example.com", type="mailbox")
    except Exception as exc:  # asyncpg's CheckViolationError
        assert "allowlist_type_check" in str(exc)
    else:
        raise AssertionError("the row was accepted")


async def test_an_entry_removed_at_mailgun_is_removed_and_one_removed_locally_is_deleted_there(
        pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, ALLOWLIST, [{"value": a, "type": "address"}
                                      for a in ("stays@example.com", "gone@example.com",
                                                "dropped@example.com")])
    await run(make_reconciler)
    emulator.remove(DOMAIN, ALLOWLIST, "gone@example.com")
    await pool.execute("DELETE FROM mailgun.allowlist WHERE value = 'dropped@example.com'")

    result = await run(make_reconciler)

    assert (result.status, result.deleted, result.removed) == ("ok", 1, 1)
    deleted = [r.path for r in emulator.requests if r.method == "DELETE"]
    assert deleted == [f"/v3/{DOMAIN}/whitelists/dropped%40example.com"]
    assert list(await rows(pool, ALLOWLIST)) == ["stays@example.com"]
    assert [r["value"] for r in emulator.records(DOMAIN, ALLOWLIST)] == ["stays@example.com"]


async def test_a_changed_reason_at_mailgun_updates_the_mirror(pool, emulator, make_reconciler):
    emulator.seed(DOMAIN, ALLOWLIST, [{"value": "vip@example.com", "reason": "old"}])
    await run(make_reconciler)
    emulator.seed(DOMAIN, ALLOWLIST, [{"value": "vip@example.com", "reason": "new"}])
    await pool.execute("UPDATE mailgun.allowlist SET synced_at = $1", AN_HOUR_AGO)

    result = await run(make_reconciler)

    assert result.updated == 1
    assert (await rows(pool, ALLOWLIST))["vip@example.com"]["reason"] == "new"

