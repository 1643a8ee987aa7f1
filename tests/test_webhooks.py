"""Signed Mailgun webhooks into the mirror: what each answer means to Mailgun, what lands where,
that nothing unsigned, replayed, stale or malformed writes anything, that every signed delivery
uses its token up whatever its answer, and that what no signature vouches for costs no database
work."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from tests.support.account import API_KEY, DOMAIN
from tests.support.mirror import insert_row, rows
from tests.support.waiting import wait_for
from tests.support.webhooks import SIGNING_KEY, deliver, event, webhook_app
from worker.errors import WebhookDataRefusedError
from worker.metrics import Metrics
from worker.records import SuppressionList
from worker.settings import Settings
from worker.webhooks.endpoint import MAX_BODY, PATH, WebhookEndpoint
from worker.webhooks.events import TokenOnly, WebhookEvent
from worker.webhooks.selftest import event_data, signed
from worker.webhooks.writer import WebhookStore, WebhookWriter, rounds

BOUNCES, UNSUBSCRIBES, COMPLAINTS = (SuppressionList.BOUNCES, SuppressionList.UNSUBSCRIBES,
                                     SuppressionList.COMPLAINTS)
OTHER_DOMAIN = "mg.example.org"


def settings(emulator, **changes) -> Settings:
    options = {"api_key": API_KEY, "api_base": str(emulator.base_url), "domains": (DOMAIN, OTHER_DOMAIN),
               "webhook_signing_key": SIGNING_KEY, **changes}
    return Settings(**options)


@pytest.fixture
async def http(pool, client, emulator, aiohttp_client):
    async with webhook_app(pool, client, settings(emulator)) as app:
        yield await aiohttp_client(app)


async def webhook_changes(pool) -> list[tuple[str, str, str, str]]:
    found = await pool.fetch("SELECT list, address, action, source FROM mailgun.changes ORDER BY id")
    return [(r["list"], r["address"], r["action"], r["source"]) for r in found]


async def nothing_written(pool) -> bool:
    """No row in the lists and no change logged (a used token aside)."""
    counts = await pool.fetchval(
        "SELECT (SELECT count(*) FROM mailgun.bounces) + (SELECT count(*) FROM mailgun.complaints)"
        " + (SELECT count(*) FROM mailgun.unsubscribes) + (SELECT count(*) FROM mailgun.changes)")
    return counts == 0


async def tokens_used(pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM mailgun.webhook_tokens")


async def mirror_is_empty(pool) -> bool:
    return await nothing_written(pool) and await tokens_used(pool) == 0


# ---- each event kind ---------------------------------------------------------------------------

async def test_a_permanent_failure_lands_in_bounces_as_synced_and_is_logged_as_a_webhook_change(http, pool):
    delivery = event("failed", "Gone@Example.com", DOMAIN, timestamp=1_780_000_000.25, code=550)

    assert await deliver(http, delivery) == (200, "stored")

    row = (await rows(pool, BOUNCES))["Gone@Example.com"]
    assert (row["domain"], row["code"], row["sync_state"]) == (DOMAIN, "550", "synced")
    assert row["error"] == "550 5.1.1 mailbox unavailable"
    assert row["created_at"] == datetime.fromtimestamp(1_780_000_000, UTC)
    assert row["synced_at"] is not None
    assert await webhook_changes(pool) == [("bounces", "Gone@Example.com", "insert", "webhook")]
    detail = await pool.fetchval("SELECT detail FROM mailgun.changes")
    assert detail == delivery["event-data"]["id"]


async def test_a_bounce_code_given_as_text_and_an_empty_message_use_the_description(http, pool):
    data = event_data("failed", "soft@example.com", DOMAIN, code="5.1.1")
    data["delivery-status"] = {"code": "5.1.1", "message": "", "description": "No such mailbox"}
    assert (await deliver(http, signed(SIGNING_KEY, data)))[0] == 200
    row = (await rows(pool, BOUNCES))["soft@example.com"]
    assert (row["code"], row["error"]) == ("5.1.1", "No such mailbox")


async def test_a_complaint_lands_in_complaints(http, pool):
    assert await deliver(http, event("complained", "angry@example.com", DOMAIN)) == (200, "stored")
    assert (await rows(pool, COMPLAINTS))["angry@example.com"]["sync_state"] == "synced"
    assert await webhook_changes(pool) == [("complaints", "angry@example.com", "insert", "webhook")]


async def test_an_unsubscribe_lands_with_the_message_tags_or_all_mail_without(http, pool):
    assert (await deliver(http, event("unsubscribed", "tagged@example.com", DOMAIN,
                                      tags=["weekly", "news", "news"])))[0] == 200
    assert (await deliver(http, event("unsubscribed", "all@example.com", DOMAIN)))[0] == 200

    mirror = await rows(pool, UNSUBSCRIBES)
    assert mirror["tagged@example.com"]["tags"] == ["news", "weekly"]
    assert mirror["all@example.com"]["tags"] == ["*"]
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}


@pytest.mark.parametrize("data", [
    event_data("failed", "later@example.com", DOMAIN, severity="temporary", code=451),
    event_data("failed", "dropped@example.com", DOMAIN, reason="suppress-bounce", code=605),
    event_data("delivered", "fine@example.com", DOMAIN),
    event_data("opened", "fine@example.com", DOMAIN),
    event_data("some-future-event", "fine@example.com", DOMAIN),
], ids=["temporary", "drop", "delivered", "opened", "unknown"])
async def test_events_that_suppress_nobody_are_answered_200_and_ignored_and_use_their_token_up(
        http, pool, data):
    status, answer = await deliver(http, signed(SIGNING_KEY, data))
    assert status == 200
    assert answer.startswith("ignored")
    assert await nothing_written(pool)
    assert await tokens_used(pool) == 1


# ---- signatures --------------------------------------------------------------------------------

async def test_a_wrong_signature_is_401_and_writes_nothing(http, pool):
    forged = event("complained", "victim@example.com", DOMAIN, key="someone-elses-key")
    status, answer = await deliver(http, forged)
    assert status == 401
    assert "MAILGUN_WEBHOOK_SIGNING_KEY" in answer
    assert await mirror_is_empty(pool)


@pytest.mark.parametrize("mangle", [
    lambda p: p.pop("signature"),
    lambda p: p["signature"].pop("token"),
    lambda p: p["signature"].update(signature="zz" * 32),
    lambda p: p["signature"].update(signature=None),
    lambda p: p["signature"].update(timestamp=str(int(p["signature"]["timestamp"]) + 1)),
    lambda p: p.update(signature="not an object"),
], ids=["no block", "no token", "not hex", "null", "other timestamp", "not an object"])
async def test_a_missing_or_mangled_signature_is_401_and_writes_nothing(http, pool, mangle):
    payload = event("complained", "victim@example.com", DOMAIN)
    mangle(payload)
    assert (await deliver(http, payload))[0] == 401
    assert await mirror_is_empty(pool)


async def test_a_subaccount_delivery_verifies_by_its_parent_signature(http, pool):
    payload = event("complained", "sub@example.com", DOMAIN, key="the-subaccount-key")
    payload["parent-signature"] = event("complained", "x@example.com", DOMAIN)["signature"]
    assert await deliver(http, payload) == (200, "stored")


async def test_a_stale_signature_is_401_and_writes_nothing(http, pool):
    two_days_ago = int(time.time()) - 2 * 86400
    payload = event("complained", "late@example.com", DOMAIN, signed_at=two_days_ago)
    status, answer = await deliver(http, payload)
    assert status == 401
    assert "WEBHOOK_MAX_AGE" in answer
    assert await mirror_is_empty(pool)


async def test_mailgun_retrying_hours_later_with_the_original_timestamp_is_accepted(http, pool):
    eight_hours_ago = int(time.time()) - 8 * 3600
    payload = event("complained", "retried@example.com", DOMAIN, signed_at=eight_hours_ago)
    assert await deliver(http, payload) == (200, "stored")


async def test_the_timestamp_window_is_configurable(pool, client, emulator, aiohttp_client):
    async with webhook_app(pool, client, settings(emulator, webhook_max_age=300)) as app:
        http = await aiohttp_client(app)
        ten_minutes_ago = int(time.time()) - 600
        assert (await deliver(http, event("complained", "a@example.com", DOMAIN,
                                          signed_at=ten_minutes_ago)))[0] == 401
        assert (await deliver(http, event("complained", "a@example.com", DOMAIN)))[0] == 200


async def test_a_replayed_token_is_ignored(http, pool):
    original = event("failed", "once@example.com", DOMAIN, code=550)
    assert await deliver(http, original) == (200, "stored")
    # The signature does not cover event-data: a replay may carry anything. It writes nothing.
    replay = {**original, "event-data": event_data("complained", "other@example.com", DOMAIN)}

    assert await deliver(http, original) == (200, "replay")
    assert await deliver(http, replay) == (200, "replay")

    assert list(await rows(pool, BOUNCES)) == ["once@example.com"]
    assert await rows(pool, COMPLAINTS) == {}
    assert len(await webhook_changes(pool)) == 1


async def test_a_token_is_remembered_across_restarts(pool, client, emulator, aiohttp_client):
    payload = event("complained", "twice@example.com", DOMAIN)
    async with webhook_app(pool, client, settings(emulator)) as app:
        assert (await deliver(await aiohttp_client(app), payload))[1] == "stored"
    async with webhook_app(pool, client, settings(emulator)) as app:
        assert (await deliver(await aiohttp_client(app), payload))[1] == "replay"


async def test_without_a_signing_key_the_endpoint_answers_503_so_mailgun_keeps_the_events(
        pool, client, emulator, aiohttp_client):
    async with webhook_app(pool, client, settings(emulator, webhook_signing_key=None),
                           signing_key=None) as app:
        http = await aiohttp_client(app)
        status, answer = await deliver(http, event("complained", "a@example.com", DOMAIN))
    assert status == 503
    assert "MAILGUN_WEBHOOK_SIGNING_KEY" in answer
    assert await mirror_is_empty(pool)


# ---- payloads that can never be stored ---------------------------------------------------------

def _without_recipient() -> dict:
    data = event_data("complained", "x@example.com", DOMAIN)
    del data["recipient"]
    return signed(SIGNING_KEY, data)


def _without_timestamp() -> dict:
    data = event_data("complained", "x@example.com", DOMAIN)
    data["timestamp"] = "yesterday"
    return signed(SIGNING_KEY, data)


def _foreign_domain() -> dict:
    return signed(SIGNING_KEY, event_data("complained", "x@example.com", "mg.somebody-else.com"))


@pytest.mark.parametrize(("body", "says", "tokens"), [
    (b"recipient=x%40example.com&event=complained", "not JSON", 0),
    (b"[1, 2]", "not a JSON object", 0),
    (orjson.dumps({"signature": event("complained", "x@example.com", DOMAIN)["signature"]}), "event-data", 1),
    (orjson.dumps(event("complained", "not-an-address", DOMAIN)), "not an address", 1),
    (orjson.dumps(_without_recipient()), "no recipient", 1),
    (orjson.dumps(_without_timestamp()), "timestamp", 1),
    (orjson.dumps(_foreign_domain()), "none of the domains this daemon syncs", 1),
    (b'{"pad": "' + b"x" * 70_000 + b'"}', "larger than", 0),
], ids=["form", "array", "no event-data", "bad address", "no recipient", "no timestamp", "foreign domain",
        "too large"])
async def test_a_payload_that_can_never_be_stored_is_406_so_mailgun_stops_retrying(
        http, pool, body, says, tokens):
    status, answer = await deliver(http, body)
    assert status == 406
    assert says in answer
    assert await nothing_written(pool)
    assert await tokens_used(pool) == tokens  # a signed one uses its token up


# ---- which domain ------------------------------------------------------------------------------

async def test_the_domain_comes_from_the_url_path_when_given(http, pool):
    data = event_data("complained", "p@example.com", "mg.somebody-else.com")
    explicit = await deliver(http, signed(SIGNING_KEY, data), path=f"/webhooks/mailgun/{OTHER_DOMAIN}")
    assert explicit[0] == 200
    assert (await rows(pool, COMPLAINTS))["p@example.com"]["domain"] == OTHER_DOMAIN
    unknown = await deliver(http, signed(SIGNING_KEY, data), path="/webhooks/mailgun/mg.unknown.com")
    assert unknown[0] == 406


@pytest.mark.parametrize("keep", ["storage", "message-id", "sender"])
async def test_the_domain_is_read_from_the_event(http, pool, keep):
    data = event_data("failed", "d@example.com", OTHER_DOMAIN)
    elsewhere = "unrelated.example.net"
    if keep != "storage":
        data["storage"] = {"url": f"https://se.api.mailgun.net/v3/domains/{elsewhere}/messages/x"}
    if keep != "message-id":
        data["message"]["headers"]["message-id"] = f"123.abc@{elsewhere}"
    if keep != "sender":
        data["envelope"]["sender"] = f"b@{elsewhere}"
        data["message"]["headers"]["from"] = f"Someone <s@{elsewhere}>"
    assert (await deliver(http, signed(SIGNING_KEY, data)))[0] == 200
    assert (await rows(pool, BOUNCES))["d@example.com"]["domain"] == OTHER_DOMAIN


# ---- rows already in the mirror ----------------------------------------------------------------

async def test_a_pending_local_row_mailgun_now_has_becomes_synced_with_its_data(http, pool):
    await insert_row(pool, BOUNCES, DOMAIN, "local@example.com", code="551", error="from the CRM")
    assert await deliver(http, event("failed", "LOCAL@example.com", DOMAIN, code=550)) == (200, "stored")
    row = (await rows(pool, BOUNCES))["local@example.com"]
    assert (row["sync_state"], row["code"]) == ("synced", "550")
    assert await webhook_changes(pool) == [("bounces", "local@example.com", "synced", "webhook")]


async def test_a_pending_unsubscribe_takes_the_union_and_stays_pending_for_tags_mailgun_lacks(http, pool):
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, "covered@example.com", tags=["news"])
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, "wider@example.com", tags=["news", "offers"])

    for address in ("covered@example.com", "wider@example.com"):
        assert (await deliver(http, event("unsubscribed", address, DOMAIN, tags=["news"])))[0] == 200

    mirror = await rows(pool, UNSUBSCRIBES)
    assert (mirror["covered@example.com"]["sync_state"], mirror["covered@example.com"]["tags"]) == \
        ("synced", ["news"])
    assert (mirror["wider@example.com"]["sync_state"], mirror["wider@example.com"]["tags"]) == \
        ("pending", ["news", "offers"])


async def test_a_synced_unsubscribe_gains_the_new_tag(http, pool):
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, "u@example.com", state="synced",
                     synced_at=datetime.now(UTC) - timedelta(hours=1), tags=["news"])
    assert (await deliver(http, event("unsubscribed", "u@example.com", DOMAIN, tags=["offers"])))[0] == 200
    row = (await rows(pool, UNSUBSCRIBES))["u@example.com"]
    assert (row["tags"], row["sync_state"]) == (["news", "offers"], "synced")


async def test_an_event_older_than_a_local_removal_leaves_the_removal_standing(http, pool):
    await insert_row(pool, COMPLAINTS, DOMAIN, "forgiven@example.com", state="synced",
                     synced_at=datetime.now(UTC) - timedelta(hours=1))
    await pool.execute("DELETE FROM mailgun.complaints")  # the application removes it
    an_hour_ago = time.time() - 3600

    answer = await deliver(http, event("complained", "forgiven@example.com", DOMAIN, timestamp=an_hour_ago))

    assert answer == (200, "superseded")
    assert await rows(pool, COMPLAINTS) == {}
    assert await pool.fetchval("SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL") == 1


async def test_an_event_newer_than_a_local_removal_cancels_it(http, pool):
    await insert_row(pool, COMPLAINTS, DOMAIN, "again@example.com", state="synced",
                     synced_at=datetime.now(UTC) - timedelta(hours=1))
    await pool.execute("DELETE FROM mailgun.complaints")
    await asyncio.sleep(1.1)  # event times are whole seconds

    assert await deliver(http, event("complained", "again@example.com", DOMAIN)) == (200, "stored")

    assert (await rows(pool, COMPLAINTS))["again@example.com"]["sync_state"] == "synced"
    assert await pool.fetchval("SELECT count(*) FROM mailgun.removals WHERE done_at IS NULL") == 0


async def test_an_unsubscribe_event_leaves_a_local_drop_of_another_tag_standing(http, pool):
    await insert_row(pool, UNSUBSCRIBES, DOMAIN, "reader@example.com", state="synced",
                     synced_at=datetime.now(UTC) - timedelta(hours=1), tags=["news", "promo"])
    await pool.execute("UPDATE mailgun.unsubscribes SET tags = '{news}'")
    await asyncio.sleep(1.1)  # event times are whole seconds

    delivery = event("unsubscribed", "reader@example.com", DOMAIN, tags=["weekly"])
    assert await deliver(http, delivery) == (200, "stored")

    assert (await rows(pool, UNSUBSCRIBES))["reader@example.com"]["tags"] == ["news", "weekly"]
    assert await pool.fetchval("SELECT tag FROM mailgun.removals") == "promo"


# ---- the writer --------------------------------------------------------------------------------

async def test_a_burst_is_written_in_few_transactions_and_every_request_answered_after_commit(http, pool):
    deliveries = [event(kind, f"burst{i:04}@example.com", DOMAIN)
                  for i in range(300) for kind in ("failed", "complained", "unsubscribed")]

    answers = await asyncio.gather(*(deliver(http, d) for d in deliveries))

    assert set(answers) == {(200, "stored")}
    for kind in (BOUNCES, COMPLAINTS, UNSUBSCRIBES):
        assert len(await rows(pool, kind)) == 300
    change_sets = await pool.fetchval("SELECT count(DISTINCT run_id) FROM mailgun.changes")
    assert change_sets == 900  # one change id per delivery, whatever batch it was written in


async def test_events_for_one_address_in_one_batch_apply_in_arrival_order(pool):
    def unsubscribe(tags: tuple[str, ...], token: str) -> WebhookEvent:
        now = datetime.now(UTC).replace(microsecond=0)
        return WebhookEvent(kind=UNSUBSCRIBES, event="unsubscribed", domain=DOMAIN, address="o@example.com",
                            occurred_at=now, token=token, signed_at=now, event_id=token, tags=tags)

    batch = [unsubscribe(("a",), "t1"), unsubscribe(("b",), "t2"), unsubscribe(("b",), "t2")]
    assert [len(r[UNSUBSCRIBES]) for r in rounds(batch)[0]] == [1, 1]

    outcomes = await WebhookStore(pool).write(batch)

    assert outcomes == ["stored", "stored", "replay"]
    assert (await rows(pool, UNSUBSCRIBES))["o@example.com"]["tags"] == ["a", "b"]


async def test_an_event_the_database_refuses_for_its_data_is_406_alone_and_the_rest_of_its_batch_is_stored(
        http, pool):
    # An application's own constraint on the mirror refuses one address.
    await pool.execute("ALTER TABLE mailgun.complaints ADD CONSTRAINT test_refuses_one"
                       " CHECK (address <> 'refused@example.com')")
    try:
        addresses = [f"fine{i:03}@example.com" for i in range(50)] + ["refused@example.com"]
        deliveries = [event("complained", a, DOMAIN) for a in addresses]
        with capture_logs() as logs:
            answers = await asyncio.gather(*(deliver(http, d) for d in deliveries))
    finally:
        await pool.execute("ALTER TABLE mailgun.complaints DROP CONSTRAINT test_refuses_one")

    assert answers[:-1] == [(200, "stored")] * 50
    # No retry could store it: 406, so Mailgun stops, logged with the constraint that refused it.
    assert answers[-1] == (406, "the database refuses the event's data for mailgun.complaints"
                                " (constraint test_refuses_one)")
    refused = [e for e in logs if e["event"] == "webhook_refused_by_database"]
    assert [(e["constraint"], e["sqlstate"], e["log_level"]) for e in refused] == \
        [("test_refuses_one", "23514", "warning")]
    assert sorted(await rows(pool, COMPLAINTS)) == addresses[:-1]
    # Its token is used up: the same delivery again, or a copy with other event-data, is a replay.
    assert await deliver(http, deliveries[-1]) == (200, "replay")
    assert await deliver(http, forged(deliveries[-1])) == (200, "replay")
    assert VICTIM not in await rows(pool, COMPLAINTS)


async def test_a_failed_batch_is_written_again_event_by_event(pool):
    now = datetime.now(UTC).replace(microsecond=0)
    events = [WebhookEvent(kind=COMPLAINTS, event="complained", domain=DOMAIN, address=address,
                           occurred_at=now, token=f"token-{address}", signed_at=now, event_id="")
              for address in ("a@example.com", "refused@example.com", "b@example.com")]
    await pool.execute("ALTER TABLE mailgun.complaints ADD CONSTRAINT test_refuses_one"
                       " CHECK (address <> 'refused@example.com')")
    try:
        with capture_logs() as logs:
            async with WebhookWriter(WebhookStore(pool), max_age=86400) as writer:
                outcomes = await asyncio.gather(*(writer.submit(e) for e in events), return_exceptions=True)
    finally:
        await pool.execute("ALTER TABLE mailgun.complaints DROP CONSTRAINT test_refuses_one")

    assert outcomes[0] == outcomes[2] == "stored"
    assert isinstance(outcomes[1], WebhookDataRefusedError)
    assert outcomes[1].constraint == "test_refuses_one"
    assert [entry["events"] for entry in logs if entry["event"] == "webhook_batch_failed"] == [3]


async def test_stopping_the_writer_writes_everything_queued_first(pool):
    now = datetime.now(UTC).replace(microsecond=0)
    events = [WebhookEvent(kind=COMPLAINTS, event="complained", domain=DOMAIN, address=f"q{i}@example.com",
                           occurred_at=now, token=f"queued-{i}", signed_at=now, event_id="")
              for i in range(7)]
    writer = WebhookWriter(WebhookStore(pool), max_age=86400, max_batch=2)
    writer.start()
    submitted = [asyncio.create_task(writer.submit(e)) for e in events]
    await asyncio.sleep(0)  # all queued
    await asyncio.wait_for(writer.stop(), 10)
    assert [t.result() for t in submitted] == ["stored"] * 7
    assert len(await rows(pool, COMPLAINTS)) == 7


async def test_a_database_failure_answers_503_and_the_retry_is_stored(
        pool, client, emulator, aiohttp_client, database_url):
    from worker.database import open_pool

    payload = event("complained", "retry@example.com", DOMAIN)
    async with open_pool(database_url, max_size=2) as doomed, \
            webhook_app(doomed, client, settings(emulator)) as app:
        http = await aiohttp_client(app)
        await doomed.close()
        assert (await deliver(http, payload))[0] == 503
    assert await mirror_is_empty(pool)

    async with webhook_app(pool, client, settings(emulator)) as app:
        assert await deliver(await aiohttp_client(app), payload) == (200, "stored")


async def test_tokens_past_the_timestamp_window_are_pruned(pool):
    await pool.execute("INSERT INTO mailgun.webhook_tokens VALUES ('old', now() - interval '3 days'),"
                       " ('new', now())")
    assert await WebhookStore(pool).prune_tokens(datetime.now(UTC) - timedelta(days=1)) == 1
    assert await pool.fetchval("SELECT array_agg(token) FROM mailgun.webhook_tokens") == ["new"]


async def test_metrics_count_webhooks_by_event_and_outcome_and_time_their_answers(
        pool, client, emulator, aiohttp_client):
    metrics = Metrics()
    async with webhook_app(pool, client, settings(emulator), metrics=metrics) as app:
        http = await aiohttp_client(app)
        payload = event("complained", "m@example.com", DOMAIN)
        await deliver(http, payload)
        await deliver(http, payload)
        await deliver(http, event("complained", "m@example.com", DOMAIN, key="wrong"))
        page = await (await http.get("/metrics")).text()
    assert 'mailgun_sync_webhooks_total{event="complained",outcome="stored"} 1.0' in page
    assert 'mailgun_sync_webhooks_total{event="complained",outcome="replay"} 1.0' in page
    assert 'mailgun_sync_webhooks_total{event="other",outcome="unauthorized"} 1.0' in page
    # How long each took to answer, by the answer's status.
    assert 'mailgun_sync_webhook_duration_seconds_count{status="200"} 2.0' in page
    assert 'mailgun_sync_webhook_duration_seconds_count{status="401"} 1.0' in page


async def test_a_flood_of_forged_webhooks_is_counted_in_full_and_logged_once_a_second(
        pool, client, emulator, aiohttp_client):
    metrics = Metrics()
    async with webhook_app(pool, client, settings(emulator), metrics=metrics) as app:
        http = await aiohttp_client(app)
        with capture_logs() as logs:
            for _ in range(20):
                assert (await deliver(http, event("complained", "f@x.com", DOMAIN, key="wrong")))[0] == 401
            assert (await deliver(http, b"not json"))[0] == 406
            await asyncio.sleep(1.0)
            assert (await deliver(http, event("complained", "f@x.com", DOMAIN, key="wrong")))[0] == 401
    refused = [(e["status"], e["not_logged_before"]) for e in logs if e["event"] == "webhook_refused"]
    assert refused == [(401, 0), (406, 0), (401, 19)]
    assert metrics.registry.get_sample_value(
        "mailgun_sync_webhooks_total", {"event": "other", "outcome": "unauthorized"}) == 21
    assert await mirror_is_empty(pool)


async def test_the_signing_key_appears_in_no_answer_log_or_metric(http, pool):
    with capture_logs() as logs:
        answers = [await deliver(http, event("complained", "k@example.com", DOMAIN)),
                   await deliver(http, event("complained", "k@example.com", DOMAIN, key="wrong")),
                   await deliver(http, b"not json")]
        page = await (await http.get("/metrics")).text()
    seen = repr(answers) + repr(logs) + page
    assert SIGNING_KEY not in seen
    assert "MAILGUN_WEBHOOK_SIGNING_KEY" in seen  # the setting is named, its value never


async def test_while_the_daemon_is_still_planning_its_domains_webhooks_are_answered_503(
        pool, aiohttp_client):
    async with WebhookWriter(WebhookStore(pool), max_age=86400) as writer:
        endpoint = WebhookEndpoint(signing_key=SIGNING_KEY, domains=list, max_age=86400, writer=writer,
                                   metrics=Metrics())
        app = web.Application(client_max_size=MAX_BODY)
        endpoint.register(app)
        http = await aiohttp_client(app)

        status, text = await deliver(http, event("complained", "early@example.com", DOMAIN))

    assert (status, text) == (503, "the daemon is starting: try again")
    assert await rows(pool, SuppressionList.COMPLAINTS) == {}


# ---- one use per token -------------------------------------------------------------------------
# The signature covers timestamp + token, not event-data: whoever holds a signed delivery can send
# it again with any event-data. So every signed delivery uses its token up with its answer.

VICTIM = "victim@example.com"


def forged(delivery: dict) -> dict:
    """The delivery's signature around a complaint nobody made."""
    return {**delivery, "event-data": event_data("complained", VICTIM, DOMAIN)}


async def _removed_an_hour_after(pool) -> dict:
    await insert_row(pool, COMPLAINTS, DOMAIN, "forgiven@example.com", state="synced",
                     synced_at=datetime.now(UTC) - timedelta(hours=2))
    await pool.execute("DELETE FROM mailgun.complaints")  # the application removes it
    return event("complained", "forgiven@example.com", DOMAIN, timestamp=time.time() - 3600)


async def _simple(delivery: dict) -> dict:
    return delivery


@pytest.mark.parametrize(("arrange", "path", "answer"), [
    (lambda pool: _simple(event("complained", "real@example.com", DOMAIN)), PATH, "stored"),
    (_removed_an_hour_after, PATH, "superseded"),
    (lambda pool: _simple(event("failed", "later@example.com", DOMAIN, severity="temporary")), PATH,
     "ignored: a temporary failure"),
    (lambda pool: _simple(event("failed", "d@example.com", DOMAIN, reason="suppress-complaint")), PATH,
     "ignored: a drop"),
    (lambda pool: _simple(event("delivered", "fine@example.com", DOMAIN)), PATH, "ignored"),
    (lambda pool: _simple(event("complained", "x@example.com", DOMAIN)), f"{PATH}/mg.unknown.com",
     "not a domain this daemon syncs"),
    (lambda pool: _simple(_foreign_domain()), PATH, "none of the domains this daemon syncs"),
    (lambda pool: _simple(_without_recipient()), PATH, "no recipient"),
    (lambda pool: _simple({"signature": event("complained", "x@example.com", DOMAIN)["signature"]}), PATH,
     "no event-data"),
], ids=["stored", "superseded", "ignored temporary failure", "ignored drop", "ignored other event",
        "unknown domain in the path", "domain named nowhere", "no recipient", "no event-data"])
async def test_every_signed_delivery_uses_its_token_up_so_a_replay_with_forged_event_data_writes_nothing(
        http, pool, arrange, path, answer):
    delivery = await arrange(pool)
    status, text = await deliver(http, delivery, path=path)
    assert status in (200, 406)
    assert answer in text
    changes = await webhook_changes(pool)

    assert await deliver(http, forged(delivery)) == (200, "replay")
    assert await deliver(http, forged(delivery), path=f"{PATH}/{DOMAIN}") == (200, "replay")

    assert VICTIM not in await rows(pool, COMPLAINTS)
    assert await webhook_changes(pool) == changes
    assert await pool.fetchval("SELECT count(*) FROM mailgun.webhook_tokens WHERE token = $1",
                               delivery["signature"]["token"]) == 1


@pytest.mark.parametrize("moved", ["e0", ".0", "0"], ids=["exponent", "point", "digit"])
async def test_a_signature_cut_elsewhere_between_timestamp_and_token_is_no_new_token(http, pool, moved):
    # Mailgun signs timestamp + token with no separator: "1780000000" + "e0abc..." signs the same as
    # "1780000000e0" + "abc...". Only whole seconds in plain digits are taken, so the second cut is
    # refused, or lands a factor of ten outside the window.
    stamp = str(int(time.time()))
    token = moved + "f" * 48
    delivery = signed(SIGNING_KEY, event_data("failed", "someone@example.com", DOMAIN, severity="temporary"),
                      token=token, timestamp=int(stamp))
    assert await deliver(http, delivery) == (200, "ignored: a temporary failure")
    forged = {"signature": {**delivery["signature"], "timestamp": stamp + moved, "token": token[len(moved):]},
              "event-data": event_data("complained", VICTIM, DOMAIN)}

    status, _ = await deliver(http, forged)

    assert status == 401
    assert VICTIM not in await rows(pool, COMPLAINTS)


async def test_an_ignored_delivery_the_database_cannot_record_is_503_and_mailguns_retry_is_taken(
        pool, client, emulator, aiohttp_client, database_url):
    from worker.database import open_pool

    delivery = event("failed", "later@example.com", DOMAIN, severity="temporary")
    async with open_pool(database_url, max_size=2) as doomed, \
            webhook_app(doomed, client, settings(emulator)) as app:
        http = await aiohttp_client(app)
        await doomed.close()
        # Answered 200 unrecorded, its token could carry a forged event later: Mailgun must retry.
        assert await deliver(http, delivery) == (503, "not stored; retry later")
    assert await mirror_is_empty(pool)  # nothing committed, the token included

    async with webhook_app(pool, client, settings(emulator)) as app:
        http = await aiohttp_client(app)
        status, text = await deliver(http, delivery)  # Mailgun's retry: same token and signature
        assert (status, text.startswith("ignored")) == (200, True)
        assert await deliver(http, forged(delivery)) == (200, "replay")
    assert VICTIM not in await rows(pool, COMPLAINTS)


def endpoint_app(writer: WebhookWriter, metrics: Metrics) -> web.Application:
    endpoint = WebhookEndpoint(signing_key=SIGNING_KEY, domains=(DOMAIN,), max_age=86400, writer=writer,
                               metrics=metrics)
    app = web.Application(client_max_size=MAX_BODY)
    endpoint.register(app)

    async def exposition(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition())

    app.router.add_get("/metrics", exposition)
    return app


async def _someone_waits_for_a_lock(pool) -> None:
    for _ in range(500):
        if await pool.fetchval("SELECT count(*) FROM pg_stat_activity"
                               " WHERE datname = current_database() AND wait_event_type = 'Lock'"):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nobody waits for the lock")


async def test_two_deliveries_with_one_token_in_one_batch_write_only_the_first(pool, aiohttp_client):
    first = event("failed", "later@example.com", DOMAIN, severity="temporary")
    async with WebhookWriter(WebhookStore(pool), max_age=86400) as writer:
        http = await aiohttp_client(endpoint_app(writer, Metrics()))
        # Hold the writer on a batch, so that the two deliveries queue up for the next one together.
        async with pool.acquire() as holder, holder.transaction():
            await holder.execute("LOCK TABLE mailgun.webhook_tokens IN SHARE ROW EXCLUSIVE MODE")
            blocker = asyncio.create_task(deliver(http, event("complained", "early@example.com", DOMAIN)))
            await _someone_waits_for_a_lock(pool)  # the blocker's batch is held
            ignored = asyncio.create_task(deliver(http, first))
            await wait_for(lambda: writer.queued == 1)
            replay = asyncio.create_task(deliver(http, forged(first)))
            await wait_for(lambda: writer.queued == 2)
        assert await blocker == (200, "stored")
        await asyncio.gather(ignored, replay)

    assert (ignored.result()[0], ignored.result()[1].startswith("ignored")) == (200, True)
    assert replay.result() == (200, "replay")
    assert list(await rows(pool, COMPLAINTS)) == ["early@example.com"]


async def test_deliveries_sharing_a_token_in_one_transaction_write_once_whatever_their_kind(pool):
    now = datetime.now(UTC).replace(microsecond=0)

    def complaint(address: str, token: str) -> WebhookEvent:
        return WebhookEvent(kind=COMPLAINTS, event="complained", domain=DOMAIN, address=address,
                            occurred_at=now, token=token, signed_at=now, event_id="")

    batch = [TokenOnly("t1", now), complaint("forged1@example.com", "t1"),
             complaint("real@example.com", "t2"), TokenOnly("t2", now),
             complaint("forged2@example.com", "t2")]

    assert await WebhookStore(pool).write(batch) == ["used", "replay", "stored", "replay", "replay"]
    assert list(await rows(pool, COMPLAINTS)) == ["real@example.com"]
    assert await WebhookStore(pool).write([TokenOnly("t1", now), complaint("again@example.com", "t2")]) == \
        ["replay", "replay"]


async def _answered_in_one_batch(pool, http, writer: WebhookWriter,
                                 deliveries: list[dict]) -> list[tuple[int, str]]:
    """The deliveries' answers, all sent in this order to be written in one batch: the writer is
    held on a batch of its own while they queue up behind it."""
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("LOCK TABLE mailgun.webhook_tokens IN SHARE ROW EXCLUSIVE MODE")
        blocker = asyncio.create_task(deliver(http, event("complained", "early@example.com", DOMAIN)))
        await _someone_waits_for_a_lock(pool)
        sent = []
        for number, delivery in enumerate(deliveries, 1):
            sent.append(asyncio.create_task(deliver(http, delivery)))
            await wait_for(lambda number=number: writer.queued == number)
    assert await blocker == (200, "stored")
    return list(await asyncio.gather(*sent))


async def test_a_forged_copy_behind_a_delivery_the_database_refuses_in_one_batch_is_a_replay(
        pool, aiohttp_client):
    genuine = event("failed", "refused@example.com", DOMAIN)
    fine = event("complained", "fine@example.com", DOMAIN)
    # An application's own constraint on the mirror refuses the genuine event: the batch fails, and
    # is written again one delivery at a time.
    await pool.execute("ALTER TABLE mailgun.bounces ADD CONSTRAINT test_refuses_one"
                       " CHECK (address <> 'refused@example.com')")
    try:
        async with WebhookWriter(WebhookStore(pool), max_age=86400) as writer:
            http = await aiohttp_client(endpoint_app(writer, Metrics()))
            answers = await _answered_in_one_batch(pool, http, writer, [genuine, forged(genuine), fine])
            await pool.execute("ALTER TABLE mailgun.bounces DROP CONSTRAINT test_refuses_one")
            again = await deliver(http, genuine)
    finally:
        await pool.execute("ALTER TABLE mailgun.bounces DROP CONSTRAINT IF EXISTS test_refuses_one")

    # The genuine delivery decides its token: refused for good (406, Mailgun stops), its token
    # used up, so the copy carrying a forged complaint is a replay, alone or sent again later.
    assert answers == [(406, "the database refuses the event's data for mailgun.bounces"
                             " (constraint test_refuses_one)"),
                       (200, "replay"), (200, "stored")]
    assert again == (200, "replay")
    assert list(await rows(pool, COMPLAINTS)) == ["early@example.com", "fine@example.com"]
    assert await rows(pool, BOUNCES) == {}


async def test_a_forged_copy_behind_a_delivery_that_fails_for_a_passing_reason_in_one_batch_fails_with_it(
        pool, aiohttp_client):
    genuine = event("failed", "flaky@example.com", DOMAIN)
    fine = event("complained", "fine@example.com", DOMAIN)
    # A failure no fault of the event's: the serialization failure a concurrent transaction can
    # cause, raised here by a trigger for one address.
    await pool.execute("""
        CREATE FUNCTION mailgun.test_fails_for_now() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'could not serialize access' USING ERRCODE = 'serialization_failure'; END $$;
        CREATE TRIGGER test_fails_for_now BEFORE INSERT OR UPDATE ON mailgun.bounces FOR EACH ROW
        WHEN (NEW.address = 'flaky@example.com') EXECUTE FUNCTION mailgun.test_fails_for_now();""")
    try:
        async with WebhookWriter(WebhookStore(pool), max_age=86400) as writer:
            http = await aiohttp_client(endpoint_app(writer, Metrics()))
            answers = await _answered_in_one_batch(pool, http, writer,
                                                   [genuine, forged(genuine), fine, forged(fine)])
            await pool.execute("DROP FUNCTION mailgun.test_fails_for_now() CASCADE")
            # Mailgun retries the genuine delivery after its 503; the copy may come again as well.
            retried = [await deliver(http, genuine), await deliver(http, forged(genuine))]
    finally:
        await pool.execute("DROP FUNCTION IF EXISTS mailgun.test_fails_for_now() CASCADE")

    # The copy is answered as its token's first delivery was: 503, nothing written, token unused.
    assert answers == [(503, "not stored; retry later"), (503, "not stored; retry later"),
                       (200, "stored"), (200, "replay")]
    assert retried == [(200, "stored"), (200, "replay")]
    assert list(await rows(pool, BOUNCES)) == ["flaky@example.com"]
    assert list(await rows(pool, COMPLAINTS)) == ["early@example.com", "fine@example.com"]


# ---- refused before the database ---------------------------------------------------------------

def _stale() -> dict:
    return event("complained", "late@example.com", DOMAIN, signed_at=int(time.time()) - 2 * 86400)


def _no_token() -> dict:
    delivery = event("complained", "a@example.com", DOMAIN)
    del delivery["signature"]["token"]
    return delivery


@pytest.mark.parametrize(("body", "status", "reason"), [
    (orjson.dumps(event("complained", VICTIM, DOMAIN, key="someone-elses-key")), 401, "mismatch"),
    (orjson.dumps({"event-data": event_data("complained", VICTIM, DOMAIN)}), 401, "missing"),
    (orjson.dumps(_no_token()), 401, "missing"),
    (orjson.dumps(_stale()), 401, "stale"),
    (b"recipient=x%40example.com&event=complained", 406, "not_json"),
    (b'{"pad": "' + b"x" * 70_000 + b'"}', 406, "too_large"),
], ids=["wrong signature", "no signature", "no token", "stale", "not JSON", "too large"])
async def test_a_request_no_signature_vouches_for_costs_no_database_work_and_is_counted_by_reason(
        database_url, aiohttp_client, body, status, reason):
    from worker.database import open_pool

    metrics = Metrics()
    async with open_pool(database_url, max_size=1) as closed:
        await closed.close()  # any query would fail, and the answer would be 503
        async with WebhookWriter(WebhookStore(closed), max_age=86400) as writer:
            http = await aiohttp_client(endpoint_app(writer, metrics))
            started = time.monotonic()
            assert (await deliver(http, body))[0] == status
            assert time.monotonic() - started < 1
            # The same pool does fail a signed delivery, which must record its token.
            assert (await deliver(http, event("delivered", "x@example.com", DOMAIN)))[0] == 503
            page = await (await http.get("/metrics")).text()

    assert f'mailgun_sync_webhooks_unverified_total{{reason="{reason}"}} 1.0' in page
    assert page.count("mailgun_sync_webhooks_unverified_total{") == 1




# ---- concurrent writers ------------------------------------------------------------------------
# Each statement of a webhook write decides on its snapshot. An application's transaction holding
# the address, committed while the write waits for it, is what the write then finds; the event is
# applied by the rules for what it finds, as if the change had come before the write began.

APPLICATION_INSERTS = "INSERT INTO mailgun.bounces (domain, address, code, error)" \
                      " VALUES ($1, 'race@example.com', '421', 'from the application')"


async def test_an_address_an_application_inserts_while_the_webhook_write_waits_on_it_takes_the_event(
        http, pool):
    # The application's INSERT is in a transaction not yet committed when the webhook's statement
    # takes its snapshot: the webhook's insert of the same address waits for it, then finds the row.
    async with pool.acquire() as application:
        async with application.transaction():
            await application.execute(APPLICATION_INSERTS, DOMAIN)
            delivery = event("failed", "race@example.com", DOMAIN, timestamp=time.time(), code=550)
            webhook = asyncio.create_task(deliver(http, delivery))
            await _someone_waits_for_a_lock(pool)
        assert await webhook == (200, "stored")

    # As for a row the write had seen: the pending row Mailgun now has becomes synced, the event's.
    row = (await rows(pool, BOUNCES))["race@example.com"]
    assert (row["sync_state"], row["code"]) == ("synced", "550")
    assert row["error"] == "550 5.1.1 mailbox unavailable"
    assert ("bounces", "race@example.com", "synced", "webhook") in await webhook_changes(pool)


@pytest.mark.parametrize("application", [
    (None, APPLICATION_INSERTS),
    ("synced", "UPDATE mailgun.bounces SET code = '421', error = 'from the application'"
               " WHERE domain = $1 AND address = 'race@example.com'"),
    ("synced", "DELETE FROM mailgun.bounces WHERE domain = $1 AND address = 'race@example.com'"),
], ids=["insert", "update", "delete"])
async def test_an_applications_change_committed_while_an_older_webhook_write_waits_on_it_stands(
        http, pool, application):
    state, change = application
    if state is not None:
        await insert_row(pool, BOUNCES, DOMAIN, "race@example.com", state=state, code="550", error="old")
    before = await rows(pool, BOUNCES)
    delivery = event("failed", "race@example.com", DOMAIN, timestamp=time.time() - 60, code=554)
    async with pool.acquire() as connection:
        async with connection.transaction():
            await connection.execute(change, DOMAIN)
            expected = {a: dict(r) for a, r in (await rows(connection, BOUNCES)).items()}
            webhook = asyncio.create_task(deliver(http, delivery))
            await _someone_waits_for_a_lock(pool)
        # The application changed the address after the event happened: its change stands.
        assert await webhook == (200, "superseded")

    assert await rows(pool, BOUNCES) == expected != before
    assert [c for c in await webhook_changes(pool) if c[3] == "webhook"] == []


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_whose_content_encoding_does_not_decode_is_400_unreadable_without_database_work(
        database_url, aiohttp_client, encoding):
    from worker.database import open_pool

    metrics = Metrics()
    async with open_pool(database_url, max_size=1) as closed:
        await closed.close()  # any query would fail, and the answer would be 503
        async with WebhookWriter(WebhookStore(closed), max_age=86400) as writer:
            http = await aiohttp_client(endpoint_app(writer, metrics))
            with capture_logs() as logs:
                async with http.post(PATH, data=orjson.dumps(event("complained", VICTIM, DOMAIN)),
                                     headers={"Content-Encoding": encoding}) as response:
                    answer = response.status, (await response.text()).strip()
            page = await (await http.get("/metrics")).text()

    assert answer == (400, f"the body could not be read: Can not decode content-encoding: {encoding}")
    assert 'mailgun_sync_webhooks_unverified_total{reason="unreadable"} 1.0' in page
    assert [(e["event"], e["log_level"], e["status"]) for e in logs] == [("webhook_refused", "warning", 400)]
