"""Mailgun's own Python SDK (PyPI `mailgun`) pages, adds, reads and deletes against the emulator.

The SDK is the client Mailgun ships, so where it and the emulator disagree the emulator is not
speaking Mailgun's wire protocol (reference sections 1-3). Its own retries are switched off, so every
request it makes shows in the emulator's log exactly once.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mailgun import ApiError, AsyncClient, Client
from mailgun.config import RetryPolicy

from tests.support.account import API_KEY, DOMAIN
from worker.emulator import EmulatorSettings, Fault, MailgunEmulator, RecordedRequest

# The SDK names the address argument after the list.
ADDRESS_ARGUMENT = {
    "bounces": "bounce_address",
    "unsubscribes": "unsubscribe_address",
    "complaints": "complaint_address",
}

NOT_FOUND = {
    "bounces": "Address not found in bounces table",
    "unsubscribes": "Address not found in unsubscribers table",
    "complaints": "No spam complaints found for this address",
}

REMOVED = {
    "bounces": "Bounced address has been removed",
    "unsubscribes": "Unsubscribe event has been removed",
    "complaints": "Spam complaint has been removed",
}


def sdk_options(emulator: MailgunEmulator, api_key: str = API_KEY) -> dict[str, Any]:
    """The emulator's base URL (no /v3: the SDK adds the version) and no retries of its own."""
    return {"auth": ("api", api_key), "api_url": emulator.base_url,
            "retry_policy": RetryPolicy(max_retries=0)}


@pytest.fixture
async def mg(emulator: MailgunEmulator) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(**sdk_options(emulator)) as client:
        yield client


def addresses(count: int) -> list[str]:
    """`count` distinct addresses; every seventh carries a `+tag`, so cursors must encode `+`."""
    return [f"user{i:03}+news@example.com" if i % 7 == 0 else f"user{i:03}@example.com"
            for i in range(count)]


def list_requests(emulator: MailgunEmulator, kind: str) -> list[RecordedRequest]:
    return [r for r in emulator.requests if r.method == "GET" and r.path == f"/v3/{DOMAIN}/{kind}"]


async def test_sdk_stream_reads_every_bounce_once_in_order(emulator, mg):
    seeded = addresses(250)
    emulator.seed(DOMAIN, "bounces", [{"address": a} for a in reversed(seeded)])

    streamed = [r async for r in mg.bounces.stream(domain=DOMAIN, filters={"limit": 40})]

    assert [r["address"] for r in streamed] == sorted(seeded)
    assert streamed == emulator.records(DOMAIN, "bounces")
    # ceil(250 / 40) full or partial pages, then the empty page that tells the SDK to stop.
    pages = list_requests(emulator, "bounces")
    assert len(pages) == math.ceil(250 / 40) + 1
    assert pages[0].query == {"limit": "40"}
    # Each later request resumes after the last address of the page before it.
    expected_cursors = [sorted(seeded)[min(i * 40, 250) - 1] for i in range(1, len(pages))]
    assert [p.query for p in pages[1:]] == [
        {"limit": "40", "page": "next", "address": cursor} for cursor in expected_cursors]


async def test_sync_sdk_stream_reads_every_bounce_once_in_order_from_a_worker_thread(emulator):
    seeded = addresses(250)
    emulator.seed(DOMAIN, "bounces", [{"address": a} for a in seeded])

    def read_all() -> list[dict[str, Any]]:
        # The sync Client blocks; off the event loop that serves the emulator it cannot stall it.
        with Client(**sdk_options(emulator)) as client:
            return list(client.bounces.stream(domain=DOMAIN, filters={"limit": 100}))

    streamed = await asyncio.to_thread(read_all)

    assert [r["address"] for r in streamed] == sorted(seeded)
    assert len(list_requests(emulator, "bounces")) == 4


@pytest.mark.parametrize("kind", ["unsubscribes", "complaints"])
async def test_sdk_stream_reads_unsubscribes_and_complaints_whole_and_in_order(emulator, mg, kind):
    seeded = addresses(30)
    records: list[dict[str, Any]] = [{"address": a} for a in seeded]
    if kind == "unsubscribes":
        records = [{**r, "tags": ["*", "news"] if i % 2 else ["*"]} for i, r in enumerate(records)]
    emulator.seed(DOMAIN, kind, records)

    streamed = [r async for r in getattr(mg, kind).stream(domain=DOMAIN, filters={"limit": 7})]

    assert [r["address"] for r in streamed] == sorted(seeded)
    assert streamed == emulator.records(DOMAIN, kind)
    assert len(list_requests(emulator, kind)) == math.ceil(30 / 7) + 1


async def test_sdk_stream_with_a_term_reads_only_addresses_with_that_prefix(emulator, mg):
    seeded = addresses(250)
    emulator.seed(DOMAIN, "bounces", [{"address": a} for a in seeded])

    streamed = [r["address"] async for r in
                mg.bounces.stream(domain=DOMAIN, filters={"limit": 15, "term": "user1"})]

    assert streamed == sorted(a for a in seeded if a.startswith("user1"))
    assert all(p.query["term"] == "user1" for p in list_requests(emulator, "bounces"))


@pytest.mark.parametrize("emulator_settings", [EmulatorSettings(past_end_items="null")])
async def test_sdk_stream_stops_when_the_page_past_the_end_has_items_null(emulator, mg):
    seeded = addresses(25)
    emulator.seed(DOMAIN, "bounces", [{"address": a} for a in seeded])

    streamed = [r["address"] async for r in mg.bounces.stream(domain=DOMAIN, filters={"limit": 10})]

    assert streamed == sorted(seeded)
    assert len(list_requests(emulator, "bounces")) == 4


async def test_sdk_stream_of_an_empty_list_makes_one_request_and_yields_nothing(emulator, mg):
    assert [r async for r in mg.complaints.stream(domain=DOMAIN, filters={"limit": 10})] == []
    assert len(list_requests(emulator, "complaints")) == 1


async def test_sdk_creates_bounces_from_a_json_array(emulator, mg):
    batch = [
        {"address": "alice@example.com", "code": "550", "error": "mailbox full"},
        {"address": "bob+promo@example.com", "code": 554, "error": "rejected",
         "created_at": "Thu, 13 Oct 2011 18:02:00 +0000"},
        {"address": "carol@example.com"},
    ]

    response = await mg.bounces.create(domain=DOMAIN, data=batch,
                                       headers={"Content-Type": "application/json"})

    assert response.status_code == 200
    assert response.json() == {"message": "3 addresses have been added to the bounces table"}
    [sent] = [r for r in emulator.requests if r.method == "POST"]
    assert sent.content_type == "application/json"
    assert sent.json() == batch
    stored = {r["address"]: r for r in emulator.records(DOMAIN, "bounces")}
    assert stored["alice@example.com"]["code"] == "550"
    assert stored["bob+promo@example.com"] == {
        "address": "bob+promo@example.com", "code": "554", "error": "rejected",
        "created_at": "Thu, 13 Oct 2011 18:02:00 UTC"}
    assert (stored["carol@example.com"]["code"], stored["carol@example.com"]["error"]) == ("550", "")


async def test_sdk_creates_one_unsubscribe_by_form_with_a_tag(emulator, mg):
    response = await mg.unsubscribes.create(
        domain=DOMAIN, data={"address": "dave+list@example.com", "tag": "newsletter"})

    assert response.status_code == 200
    assert response.json() == {"address": "dave+list@example.com",
                               "message": "Address has been added to the unsubscribes table"}
    [sent] = [r for r in emulator.requests if r.method == "POST"]
    assert sent.content_type == "application/x-www-form-urlencoded"
    response = await mg.unsubscribes.get(domain=DOMAIN, unsubscribe_address="dave+list@example.com")
    assert response.status_code == 200
    record = response.json()
    assert (record["address"], record["tags"]) == ("dave+list@example.com", ["newsletter"])


async def test_sdk_creates_unsubscribes_from_a_json_array_with_tags(emulator, mg):
    response = await mg.unsubscribes.create(
        domain=DOMAIN, headers={"Content-Type": "application/json"},
        data=[{"address": "erin@example.com", "tags": ["news", "offers"]},
              {"address": "frank@example.com"}])

    assert response.json() == {"message": "2 addresses have been added to the unsubscribes table"}
    tags = {r["address"]: r["tags"] for r in emulator.records(DOMAIN, "unsubscribes")}
    assert tags == {"erin@example.com": ["news", "offers"], "frank@example.com": ["*"]}


async def test_sdk_creates_a_complaint_by_form_and_complaints_from_a_json_array(emulator, mg):
    response = await mg.complaints.create(domain=DOMAIN, data={"address": "grace@example.com"})
    assert response.status_code == 200
    assert response.json() == {"address": "grace@example.com",
                               "message": "Address has been added to the complaints table"}

    response = await mg.complaints.create(
        domain=DOMAIN, headers={"Content-Type": "application/json"},
        data=[{"address": "heidi@example.com"}, {"address": "ivan+x@example.com"}])
    assert response.json() == {
        "message": "2 complaint addresses have been added to the complaints table"}

    stored = [r["address"] for r in emulator.records(DOMAIN, "complaints")]
    assert stored == ["grace@example.com", "heidi@example.com", "ivan+x@example.com"]


async def test_sdk_gets_one_bounce_whose_address_has_a_plus(emulator, mg):
    emulator.seed(DOMAIN, "bounces", [
        {"address": "judy+tag@example.com", "code": "551", "error": "user unknown",
         "created_at": "Mon, 03 Feb 2020 19:50:58 UTC"},
        {"address": "plain@example.com"},
    ])

    response = await mg.bounces.get(domain=DOMAIN, bounce_address="judy+tag@example.com")

    assert response.status_code == 200
    assert response.json() == {"address": "judy+tag@example.com", "code": "551",
                               "error": "user unknown", "created_at": "Mon, 03 Feb 2020 19:50:58 UTC"}
    # The SDK percent-encodes the path segment, so Mailgun's `+`-as-space decoding does not bite.
    assert emulator.requests[-1].path == f"/v3/{DOMAIN}/bounces/judy%2Btag%40example.com"
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"


@pytest.mark.parametrize("kind", ["bounces", "unsubscribes", "complaints"])
async def test_sdk_get_of_an_unlisted_address_is_404_with_mailgun_message(mg, kind):
    endpoint = getattr(mg, kind)
    response = await endpoint.get(domain=DOMAIN, **{ADDRESS_ARGUMENT[kind]: "nobody@example.com"})
    assert response.status_code == 404
    assert response.json() == {"message": NOT_FOUND[kind]}


@pytest.mark.parametrize("kind", ["bounces", "unsubscribes", "complaints"])
async def test_sdk_deletes_one_address_and_then_reads_404(emulator, mg, kind):
    emulator.seed(DOMAIN, kind, [{"address": "kate+old@example.com"}, {"address": "kate@example.com"}])
    endpoint = getattr(mg, kind)
    target = {ADDRESS_ARGUMENT[kind]: "kate+old@example.com"}

    response = await endpoint.delete(domain=DOMAIN, **target)

    assert response.status_code == 200
    assert response.json() == {"address": "kate+old@example.com", "message": REMOVED[kind]}
    assert [r["address"] for r in emulator.records(DOMAIN, kind)] == ["kate@example.com"]
    response = await endpoint.get(domain=DOMAIN, **target)
    assert (response.status_code, response.json()) == (404, {"message": NOT_FOUND[kind]})
    response = await endpoint.delete(domain=DOMAIN, **target)
    assert (response.status_code, response.json()) == (404, {"message": NOT_FOUND[kind]})


async def test_sdk_stream_raises_api_error_on_a_503_mid_list_without_retrying(emulator, mg):
    emulator.seed(DOMAIN, "bounces", [{"address": a} for a in addresses(30)])
    emulator.inject(Fault(status=503, list="bounces", page="next"))

    stream = mg.bounces.stream(domain=DOMAIN, filters={"limit": 10})
    first_page = [(await anext(stream))["address"] for _ in range(10)]
    with pytest.raises(ApiError):
        await anext(stream)

    assert first_page == sorted(addresses(30))[:10]
    assert [r.status for r in list_requests(emulator, "bounces")] == [200, 503]


async def test_sdk_with_a_wrong_key_is_refused_with_401(emulator):
    async with AsyncClient(**sdk_options(emulator, api_key="key-wrong")) as client:
        response = await client.bounces.get(domain=DOMAIN)
        assert response.status_code == 401
        assert response.text == "Forbidden"
        with pytest.raises(ApiError):
            [r async for r in client.bounces.stream(domain=DOMAIN)]
