"""The mirror on a database whose default collation is not C (ICU's en-US, the default of many
managed servers): unsubscribe tags are kept in code-point order, the order in which the pull
reads them, whichever side wrote them (an application's INSERT or UPDATE, a webhook, a pending
row adopted, two spellings merged), so the run after a write changes nothing; and tag sets compare
by their bytes alone, as in a C database. An address's key folds ASCII letters only, whatever the
collation."""

from __future__ import annotations

import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from tests.support import database
from tests.support.account import API_KEY, DOMAIN
from tests.support.mirror import insert_row, rows
from tests.support.webhooks import SIGNING_KEY, deliver, event, webhook_app
from worker.database import open_pool
from worker.emulator import MailgunEmulator
from worker.mailgun import MailgunClient
from worker.migrate import migrate
from worker.reconcile import ListResult, ReconcileOptions, Reconciler
from worker.records import SuppressionList
from worker.settings import Settings
from worker.sql import migrations, queries
from worker.store import MirrorStore

BOUNCES = SuppressionList.BOUNCES
UNSUBSCRIBES = SuppressionList.UNSUBSCRIBES
# Upper and lower case, punctuation, an accented letter: en-US sorts them _x, a, B, Z, é.
TAGS = ["é", "a", "B", "_x", "Z"]
CODE_POINT_ORDER = ["B", "Z", "_x", "a", "é"]
assert sorted(TAGS) == CODE_POINT_ORDER

TAG_ORDER_MIGRATION = next(m.version for m in migrations() if m.name == "tags_in_code_point_order")

Reconcile = Callable[[], Awaitable[ListResult]]


@pytest.fixture
async def icu_pool(test_database: database.TestDatabase) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a migrated mirror in a database whose default collation is ICU's en-US."""
    async with database.icu_database(test_database.admin_url) as url, open_pool(url) as pool:
        await migrate(pool)
        yield pool


@pytest.fixture
def reconcile(icu_pool: asyncpg.Pool, client: MailgunClient) -> Reconcile:
    reconciler = Reconciler(MirrorStore(icu_pool), client, ReconcileOptions())

    async def run() -> ListResult:
        result = await reconciler.reconcile(uuid.uuid4(), DOMAIN, UNSUBSCRIBES)
        assert result.status == "ok", result.error
        return result

    return run


@pytest.fixture
async def http(icu_pool: asyncpg.Pool, client: MailgunClient, emulator: MailgunEmulator,
               aiohttp_client: Any) -> AsyncIterator[Any]:
    settings = Settings(api_key=API_KEY, api_base=str(emulator.base_url), domains=(DOMAIN,),
                        webhook_signing_key=SIGNING_KEY)
    async with webhook_app(icu_pool, client, settings) as app:
        yield await aiohttp_client(app)


async def tags(pool: asyncpg.Pool, address_key: str) -> list[str]:
    return list(await pool.fetchval("SELECT tags FROM mailgun.unsubscribes WHERE address_key = $1",
                                    address_key))


async def assert_changes_nothing(reconcile: Reconcile, pool: asyncpg.Pool) -> None:
    """A run that reads the list and neither writes a row nor logs a change."""
    before = await pool.fetchval("SELECT count(*) FROM mailgun.changes")
    result = await reconcile()
    assert (result.inserted, result.updated, result.removed, result.adopted, result.pushed,
            result.rejected, result.deleted) == (0, 0, 0, 0, 0, 0, 0), result
    assert await pool.fetchval("SELECT count(*) FROM mailgun.changes") == before


async def test_an_application_insert_stores_tags_in_code_point_order_and_the_run_after_its_push_is_a_no_op(
        icu_pool, reconcile, emulator):
    await insert_row(icu_pool, UNSUBSCRIBES, DOMAIN, "app@example.com", tags=[*TAGS, "a", ""])
    assert await tags(icu_pool, "app@example.com") == CODE_POINT_ORDER

    assert (await reconcile()).pushed == 1
    assert emulator.records(DOMAIN, UNSUBSCRIBES)[0]["tags"] == CODE_POINT_ORDER
    await assert_changes_nothing(reconcile, icu_pool)


async def test_an_application_update_that_keeps_the_tag_set_leaves_a_synced_unsubscribe_synced_and_unchanged(
        icu_pool, reconcile, emulator):
    """An ORM that writes every column back on save, the tags among them, changes nothing."""
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "saved@example.com", "tags": TAGS}])
    assert (await reconcile()).inserted == 1

    await icu_pool.execute("UPDATE mailgun.unsubscribes SET tags = tags")
    row = (await rows(icu_pool, UNSUBSCRIBES))["saved@example.com"]
    assert (row["sync_state"], list(row["tags"])) == ("synced", CODE_POINT_ORDER)
    assert await icu_pool.fetchval("SELECT count(*) FROM mailgun.removals") == 0
    await assert_changes_nothing(reconcile, icu_pool)


async def test_an_application_update_writing_the_same_tags_in_another_order_changes_nothing(
        icu_pool, reconcile, emulator):
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "set@example.com", "tags": TAGS}])
    await reconcile()

    await icu_pool.execute("UPDATE mailgun.unsubscribes SET tags = $1", [*reversed(TAGS), "a"])
    row = (await rows(icu_pool, UNSUBSCRIBES))["set@example.com"]
    assert (row["sync_state"], list(row["tags"])) == ("synced", CODE_POINT_ORDER)
    await assert_changes_nothing(reconcile, icu_pool)


async def test_a_pending_unsubscribe_adopted_with_the_union_of_tags_is_left_alone_by_the_next_run(
        icu_pool, reconcile, emulator):
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "both@example.com", "tags": ["B", "_x", "Z"]}])
    await insert_row(icu_pool, UNSUBSCRIBES, DOMAIN, "both@example.com", tags=["é", "a"])

    first = await reconcile()
    assert (first.adopted, first.pushed) == (0, 1)  # adopted, still pending for "a" and "é", pushed
    assert await tags(icu_pool, "both@example.com") == CODE_POINT_ORDER
    await assert_changes_nothing(reconcile, icu_pool)


async def test_a_webhook_adding_tags_to_a_synced_unsubscribe_stores_them_in_code_point_order(
        icu_pool, reconcile, emulator, http):
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "hook@example.com", "tags": ["B", "Z"]}])
    await reconcile()
    # Mailgun records the unsubscribe under the message's tags, and says so.
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "hook@example.com", "tags": ["é", "a", "_x"]}])
    delivery = event("unsubscribed", "hook@example.com", DOMAIN, tags=["é", "a", "_x"],
                     timestamp=int(time.time()))
    assert await deliver(http, delivery) == (200, "stored")

    assert await tags(icu_pool, "hook@example.com") == CODE_POINT_ORDER
    await assert_changes_nothing(reconcile, icu_pool)


async def test_two_spellings_at_mailgun_merge_their_tags_in_code_point_order(
        icu_pool, reconcile, emulator):
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "Dup@example.com", "tags": ["é", "a"]},
                                         {"address": "dup@example.com", "tags": ["B", "_x", "Z"]}])
    assert (await reconcile()).inserted == 1
    assert await tags(icu_pool, "dup@example.com") == CODE_POINT_ORDER
    await assert_changes_nothing(reconcile, icu_pool)


async def test_tag_sets_compare_by_their_bytes_whatever_the_collation(icu_pool):
    """Containment and (in)equality of tag arrays use equality, which a deterministic collation (a
    database's default always is one) decides by the bytes: case, accents and Unicode normal forms
    are told apart, order alone matters only to IS DISTINCT FROM."""
    decomposed = unicodedata.normalize("NFD", "é")
    assert decomposed != "é"
    compare = ("SELECT $1::text[] @> $2::text[] AS contains,"
               " $1::text[] IS DISTINCT FROM $2::text[] AS distinct_")
    cases = [
        (["a", "B"], ["B"], True, True),
        (["a", "B"], ["b"], False, True),
        (["é"], [decomposed], False, True),
        (CODE_POINT_ORDER, TAGS, True, True),
        (CODE_POINT_ORDER, list(CODE_POINT_ORDER), True, False),
    ]
    for left, right, contains, distinct in cases:
        found = await icu_pool.fetchrow(compare, left, right)
        assert (found["contains"], found["distinct_"]) == (contains, distinct), (left, right)


async def test_migrating_re_sorts_stored_tags_without_touching_states_times_or_removals(
        test_database):
    """Rows written before (by the worker, which bypasses the mirror's triggers) may hold their
    tags in the database's collation order; migrating puts them in code-point order."""
    collation_order = ["_x", "a", "B", "Z", "é"]
    synced_at = datetime.now(UTC) - timedelta(hours=1)
    async with database.icu_database(test_database.admin_url) as url, open_pool(url) as pool:
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute(queries()["create_migrations_table"])
            for migration in migrations():
                if migration.version < TAG_ORDER_MIGRATION:
                    await connection.execute(migration.sql)
                    await connection.execute(queries()["record_migration"], migration.version,
                                             migration.name)
            await connection.execute(queries()["mark_worker_writes"])
            await insert_row(connection, UNSUBSCRIBES, DOMAIN, "old@example.com", state="synced",
                             synced_at=synced_at, tags=collation_order)
            await insert_row(connection, UNSUBSCRIBES, DOMAIN, "waiting@example.com",
                             tags=collation_order)
        before = await rows(pool, UNSUBSCRIBES)
        assert list(before["old@example.com"]["tags"]) == collation_order

        assert TAG_ORDER_MIGRATION in await migrate(pool)

        after = await rows(pool, UNSUBSCRIBES)
        for address, row in after.items():
            assert list(row.pop("tags")) == CODE_POINT_ORDER
            assert row == {k: v for k, v in before[address].items() if k != "tags"}
        assert await pool.fetchval("SELECT count(*) FROM mailgun.removals") == 0
        # The worker's mark is gone with the migration: an application's writes are its own again.
        await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{news}'"
                           " WHERE address_key = 'old@example.com'")
        assert (await rows(pool, UNSUBSCRIBES))["old@example.com"]["sync_state"] == "pending"


async def test_pending_rows_read_in_small_batches_are_each_pushed_once_whatever_their_order(
        icu_pool, client, emulator):
    """The push reads pending rows by keyset (`address_key > last ORDER BY address_key`), which
    the database orders and compares by one collation, its own: en-US ignores the punctuation that
    code-point order puts first, and every row is still read once."""
    addresses = ["ab@example.com", "a.c@example.com", "a-b@example.com", "_x@example.com",
                 "0@example.com", "zoe@example.com", "Zed@example.com", "b@example.com"]
    for address in addresses:
        await insert_row(icu_pool, SuppressionList.BOUNCES, DOMAIN, address)
    reconciler = Reconciler(MirrorStore(icu_pool), client, ReconcileOptions(push_batch_size=3))

    result = await reconciler.reconcile(uuid.uuid4(), DOMAIN, SuppressionList.BOUNCES)

    assert (result.status, result.pushed, result.rejected) == ("ok", len(addresses), 0)
    stored = emulator.records(DOMAIN, SuppressionList.BOUNCES)
    assert sorted(r["address"] for r in stored) == sorted(addresses)
    posted = [r for r in emulator.requests if r.method == "POST"]
    assert len(posted) == 3


async def test_a_pull_in_parallel_ranges_cut_from_the_mirror_reads_the_whole_list_once(
        icu_pool, client, emulator):
    """The ranges' pivots are addresses sampled from the mirror and sorted by the worker in
    code-point order, Mailgun's, not by the database: a sample read in en-US order cuts the same
    ranges."""
    prefixes = ["_", "a.", "a", "B", "b-", "Z", "y", "0"]
    addresses = [f"{prefix}{n:03d}@example.com" for prefix in prefixes for n in range(300)]
    emulator.seed(DOMAIN, SuppressionList.BOUNCES, [{"address": a} for a in addresses])
    reconciler = Reconciler(MirrorStore(icu_pool), client, ReconcileOptions(pull_ranges=2))
    assert (await reconciler.reconcile(uuid.uuid4(), DOMAIN, SuppressionList.BOUNCES)).inserted == \
        len(addresses)
    emulator.requests.clear()

    with capture_logs() as logs:
        again = await reconciler.reconcile(uuid.uuid4(), DOMAIN, SuppressionList.BOUNCES)

    assert (again.status, again.pulled, again.inserted, again.updated, again.removed) == \
        ("ok", len(addresses), 0, 0, 0)
    assert not [entry for entry in logs if entry["event"] == "ranges_abandoned"]
    # The sample is the whole table here, so the one pivot is the code-point median.
    median = sorted(addresses)[len(addresses) // 2]
    assert any(r.query.get("address") == median for r in emulator.requests if r.method == "GET")


async def test_keys_fold_ascii_letters_only_whatever_the_collation(pool):
    await insert_row(pool, BOUNCES, DOMAIN, "INFO@Example.COM")
    await insert_row(pool, BOUNCES, DOMAIN, "ÄBC@X.COM")
    keys = {r["address"]: r["address_key"] for r in (await rows(pool, BOUNCES)).values()}
    assert keys == {"INFO@Example.COM": "info@example.com", "ÄBC@X.COM": "Äbc@x.com"}
