"""Reading whole lists: every record once, in both paging styles, and no trust in a bad page."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.support.account import API_KEY, DOMAIN
from worker import errors
from worker.emulator import EmulatorSettings, Fault, MailgunEmulator
from worker.records import SuppressionList

ALL_LISTS = list(SuppressionList)


def wire_records(kind: SuppressionList, count: int) -> list[dict]:
    key = kind.address_field
    return [{key: f"user{i:05}+tag@example.com", "code": 550 if i % 2 else "551",
             "tags": ["*", f"t{i % 3}"]} for i in range(count)]


async def pull(client, kind=SuppressionList.BOUNCES, domain=DOMAIN) -> list:
    return [record async for record in client.records(domain, kind)]


@pytest.mark.parametrize("kind", ALL_LISTS)
async def test_pull_reads_2345_records_once_each_with_keyset_paging(emulator, make_client, kind):
    emulator.seed(DOMAIN, kind, wire_records(kind, 2345))
    records = await pull(make_client(page_limit=100), kind)
    addresses = [r.address for r in records]
    assert addresses == sorted(f"user{i:05}+tag@example.com" for i in range(2345))
    pages = [r for r in emulator.requests if r.method == "GET"]
    # 24 pages of records, the empty page that ends them, and Mailgun's last page to confirm
    # the list ended there.
    assert len(pages) == 26
    assert pages[0].query == {"limit": "100", "term": ""}
    assert pages[1].query["page"] == "next"
    assert pages[-1].query == {"page": "last", "limit": "100", "term": ""}


@pytest.mark.parametrize("kind", [SuppressionList.BOUNCES, SuppressionList.COMPLAINTS])
async def test_pull_reads_2345_records_from_the_legacy_v2_offset_api(emulator, make_client, kind):
    emulator.seed(DOMAIN, kind, wire_records(kind, 2345))
    records = await pull(make_client(page_limit=300, api_version="v2"), kind)
    assert len({r.address for r in records}) == len(records) == 2345
    # Each page after the first is asked from the last record read, which it must hold.
    skips = [r.query.get("skip") for r in emulator.requests]
    assert skips == [None, *[str(n) for n in range(299, 2344, 299)]]


@pytest.mark.parametrize("emulator_settings", [EmulatorSettings(paging_style="offset")])
async def test_pull_follows_an_offset_style_answer_on_v3(emulator, make_client):
    emulator.seed(DOMAIN, "unsubscribes", wire_records(SuppressionList.UNSUBSCRIBES, 2345))
    records = await pull(make_client(page_limit=1000), SuppressionList.UNSUBSCRIBES)
    # The legacy form lists one row per (address, tag); each address carries two tags here.
    assert len(records) == 2 * 2345
    assert {r.address for r in records} == {f"user{i:05}+tag@example.com" for i in range(2345)}


@pytest.mark.parametrize("emulator_settings", [EmulatorSettings(past_end_items="null")])
async def test_pull_ends_on_items_null_past_the_last_page(emulator, make_client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 10))
    assert len(await pull(make_client(page_limit=4))) == 10


async def test_a_list_that_ends_early_is_not_taken_as_complete(emulator, make_client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 10))
    emulator.inject(Fault(action="items_null", page="next", skip=1))  # the third page says "nothing"
    with pytest.raises(errors.PagingError, match="the pull is incomplete"):
        await pull(make_client(page_limit=3))


async def test_a_cursor_that_goes_backwards_stops_the_pull(emulator, make_client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 10))
    emulator.inject(Fault(action="backwards_next"))
    with pytest.raises(errors.PagingError, match="records could be skipped or repeated"):
        await pull(make_client(page_limit=3))


async def test_a_body_that_is_not_utf8_is_read_again_then_refused(emulator, client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 3))
    emulator.inject(Fault(action="invalid_utf8", times=None))
    with pytest.raises(errors.MalformedPageError, match="not JSON"):
        await pull(client)


async def test_an_empty_list_is_confirmed_by_mailguns_last_page(emulator, client):
    assert await pull(client) == []
    assert [r.query.get("page", "") for r in emulator.requests] == ["", "last"]


async def test_an_empty_first_page_of_a_list_that_is_not_empty_is_not_the_end(emulator, client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 5))
    emulator.inject(Fault(action="items_null", page=""))
    with pytest.raises(errors.PagingError, match="the pull is incomplete"):
        await pull(client)


async def test_a_legacy_list_that_ends_before_its_total_count_is_not_the_end(emulator, make_client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 10))
    emulator.inject(Fault(action="items_null", path_contains="/v2/", skip=1))
    with pytest.raises(errors.PagingError, match="ended after 3 of its 10 records"):
        await pull(make_client(page_limit=3, api_version="v2"))


async def test_seed_document_samples_parse(emulator, client):
    emulator.seed(DOMAIN, "bounces", [
        {"code": 550, "created_at": "Fri, 21 Oct 2011 11:02:55 GMT", "error": "Message was not "
         "accepted -- invalid mailbox. Local mailbox 'serobnic@mail.ru is unavailable: user not found",
         "address": "'serobnic@mail.ru"},
        {"address": "alice@example.com", "code": "550", "error": "Message was not accepted",
         "created_at": "Thu, 13 Oct 2011 18:02:00 +0000"},
    ])
    serobnic, alice = await pull(client)
    assert (serobnic.address, serobnic.code) == ("'serobnic@mail.ru", "550")
    assert serobnic.created_at == datetime(2011, 10, 21, 11, 2, 55, tzinfo=UTC)
    assert (alice.code, alice.created_at) == ("550", datetime(2011, 10, 13, 18, 2, tzinfo=UTC))


async def test_pull_can_resume_after_an_address(emulator, make_client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 30))
    client = make_client(page_limit=7)
    pages = [page async for page in client.pages(DOMAIN, SuppressionList.BOUNCES,
                                                 after="user00019+tag@example.com")]
    assert [r.address for p in pages for r in p.records] == [
        f"user{i:05}+tag@example.com" for i in range(20, 30)]


# An address too long for a URL (most servers, the emulator too, refuse a request line over 8 KB):
# Mailgun's paging.next names it as the cursor all the same.
LONG = "ok0" + "x" * 10_000 + "@example.com"
BOUNCES = SuppressionList.BOUNCES


def ok(count: int) -> list[dict]:
    return [{"address": f"ok{i}@example.com"} for i in range(count)]


async def test_a_10000_character_address_that_ends_a_page_does_not_block_the_list(
        pool, emulator, make_client, make_reconciler):
    import uuid

    emulator.seed(DOMAIN, BOUNCES, [*ok(6), {"address": LONG}])  # LONG sorts right after ok0
    result = await make_reconciler(make_client(page_limit=2)).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (result.status, result.error) == ("ok", None)
    assert (result.inserted, result.skipped) == (6, 1)
    # The pull went on after a prefix of it; the records from there up to it were read again.
    assert all(len(r.query.get("address", "")) < 4096 for r in emulator.requests)


async def test_addresses_too_long_for_a_url_that_begin_alike_are_read_once_each_in_order(
        emulator, make_client):
    alike = [LONG.replace("@", f"{c}@") for c in "abc"]
    emulator.seed(DOMAIN, BOUNCES, [*ok(6), *({"address": a} for a in alike)])
    pages = [page async for page in make_client(page_limit=4).pages(DOMAIN, BOUNCES, ordered=True)]
    assert [s.address for page in pages for s in page.skipped] == alike
    assert [r.address for page in pages for r in page.records] == [f"ok{i}@example.com" for i in range(6)]


async def test_an_address_too_long_for_a_url_that_ends_the_list_is_vouched_for_by_the_last_page(
        emulator, make_client):
    last = LONG.replace("ok0", "ok9")
    emulator.seed(DOMAIN, BOUNCES, [*ok(4), {"address": last}])
    pages = [page async for page in make_client(page_limit=2).pages(DOMAIN, BOUNCES)]
    assert [s.address for page in pages for s in page.skipped] == [last]
    assert [r.address for page in pages for r in page.records] == [f"ok{i}@example.com" for i in range(4)]
    assert emulator.requests[-1].query["page"] == "last"


async def test_an_empty_page_after_a_shortened_cursor_is_not_the_end(emulator, make_client):
    emulator.seed(DOMAIN, BOUNCES, [*ok(6), {"address": LONG}])
    emulator.inject(Fault(action="items_null", page="next"))
    with pytest.raises(errors.PagingError, match="the pull is incomplete"):
        await pull(make_client(page_limit=2))


async def test_a_pull_resumed_after_an_address_too_long_for_a_url_continues_after_it(
        emulator, make_client):
    emulator.seed(DOMAIN, BOUNCES, [*ok(6), {"address": LONG}])
    pages = [page async for page in make_client(page_limit=2).pages(DOMAIN, BOUNCES, after=LONG,
                                                                    resumed=True)]
    assert [r.address for page in pages for r in page.records] == [f"ok{i}@example.com" for i in range(1, 6)]
    assert not [s for page in pages for s in page.skipped]


async def test_next_url_on_another_origin_stops_the_pull_and_gets_no_key(emulator, make_client):
    async with MailgunEmulator(api_key=API_KEY, domains=[DOMAIN]) as elsewhere:
        emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 5))
        emulator.inject(Fault(action="foreign_next", foreign_origin=elsewhere.base_url))
        with pytest.raises(errors.PagingError, match="not following it") as caught:
            await pull(make_client(page_limit=2))
        assert len(elsewhere.requests) == 0
        assert API_KEY not in str(caught.value)


async def test_a_next_url_that_repeats_forever_stops_the_pull(emulator, make_client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 5))
    emulator.inject(Fault(action="repeat_next", times=None))
    with pytest.raises(errors.PagingError, match="not advancing"):
        await pull(make_client(page_limit=2))
    assert len(emulator.requests) == 1


async def test_page_cap_stops_a_pull_that_does_not_end(emulator, make_client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 50))
    with pytest.raises(errors.PagingError, match="stopped after 3 pages"):
        await pull(make_client(page_limit=5, max_pages=3))


async def test_a_relative_next_url_is_refused(emulator, make_client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 3))
    emulator.inject(Fault(action="foreign_next", foreign_origin=""))
    with pytest.raises(errors.PagingError, match="not following it"):
        await pull(make_client(page_limit=2))


async def test_a_next_url_that_does_not_parse_stops_the_pull_as_a_malformed_page(emulator, make_client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 3))
    emulator.inject(Fault(action="foreign_next", foreign_origin="https://[::1"))
    with pytest.raises(errors.MalformedPageError, match=r"paging\.next is not a URL"):
        await pull(make_client(page_limit=2))
    assert len(emulator.requests) == 1


async def test_a_truncated_page_is_fetched_again(emulator, client, sleeps):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 3))
    emulator.inject(Fault(action="truncated_json"))
    assert len(await pull(client)) == 3
    assert len(sleeps.waits) == 1


async def test_a_page_that_stays_malformed_is_a_malformed_page_error(emulator, client):
    emulator.inject(Fault(action="malformed_json", times=None))
    with pytest.raises(errors.MalformedPageError, match="not JSON") as caught:
        await pull(client)
    assert caught.value.url is not None
    assert len(emulator.requests) == 4  # every attempt the policy allows


async def test_a_connection_reset_mid_page_is_retried(emulator, client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 300))
    emulator.inject(Fault(action="reset"))
    assert len(await pull(client)) == 300


async def test_a_page_far_larger_than_asked_is_refused_without_retry(emulator, make_client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 3))
    emulator.inject(Fault(action="oversized", size_bytes=2_000_000))
    with pytest.raises(errors.MalformedPageError, match="cap"):
        await pull(make_client(max_response_bytes=1_000_000))
    assert len(emulator.requests) == 1


async def test_items_that_are_not_records_name_the_problem(emulator, client):
    emulator.seed(DOMAIN, "bounces", [{"address": "a@example.com"}])
    emulator.tables.table(DOMAIN, SuppressionList.BOUNCES).rows()[0]["created_at"] = 12
    with pytest.raises(errors.MalformedPageError, match="created_at"):
        await pull(client)


async def test_a_wrong_key_is_an_auth_error_that_names_key_and_region(make_client):
    with pytest.raises(errors.MailgunAuthError) as caught:
        await pull(make_client(api_key="key-wrong-secret"))
    message = str(caught.value)
    assert "MAILGUN_API_KEY" in message
    assert "api.eu.mailgun.net" in message
    assert "key-wrong-secret" not in message


async def test_an_unknown_domain_is_a_not_found_error(client):
    with pytest.raises(errors.MailgunNotFoundError, match=r"Domain not found: nope\.example\.org"):
        await pull(client, domain="nope.example.org")


async def test_get_and_delete_encode_plus_in_addresses(emulator, client):
    emulator.seed(DOMAIN, "bounces", [{"address": "first+last@example.com", "code": "551"}])
    record = await client.get(DOMAIN, SuppressionList.BOUNCES, "first+last@example.com")
    assert record is not None
    assert record.code == "551"
    assert await client.delete(DOMAIN, SuppressionList.BOUNCES, "first+last@example.com") is True
    assert await client.delete(DOMAIN, SuppressionList.BOUNCES, "first+last@example.com") is False
    assert await client.get(DOMAIN, SuppressionList.BOUNCES, "first+last@example.com") is None


async def test_delete_can_remove_one_unsubscribe_tag(emulator, client):
    emulator.seed(DOMAIN, "unsubscribes", [{"address": "u@example.com", "tags": ["*", "news"]}])
    assert await client.delete(DOMAIN, SuppressionList.UNSUBSCRIBES, "u@example.com", tag="news")
    [record] = await pull(client, SuppressionList.UNSUBSCRIBES)
    assert record.tags == ("*",)


async def test_an_empty_last_page_does_not_vouch_for_a_pull_that_ended_early(emulator, make_client):
    emulator.seed(DOMAIN, "bounces", wire_records(SuppressionList.BOUNCES, 10))
    # The third page says "nothing", and so does the last page asked to confirm it: two answers
    # that disagree with the records already read, not an end.
    emulator.inject(Fault(action="items_null", page="next", skip=1))
    emulator.inject(Fault(action="items_null", page="last"))
    with pytest.raises(errors.PagingError, match="the list's last page is empty; the pull is incomplete"):
        await pull(make_client(page_limit=3))


@pytest.mark.parametrize(("kind", "seeded", "expected"), [
    (SuppressionList.BOUNCES, {"address": "a@example.com", "code": "550", "error": "gone"},
     {"code": "550", "error": "gone"}),
    (SuppressionList.COMPLAINTS, {"address": "a@example.com"}, {}),
    (SuppressionList.UNSUBSCRIBES, {"address": "a@example.com", "tags": ["*", "news"]},
     {"tags": ("*", "news")}),
], ids=["bounce", "complaint", "unsubscribe"])
async def test_get_reads_the_v2_single_record_shapes(emulator, make_client, kind, seeded, expected):
    emulator.seed(DOMAIN, kind, [seeded])
    client = make_client(api_version="v2")
    record = await client.get(DOMAIN, kind, "a@example.com")
    assert record is not None and record.address == "a@example.com"
    assert {name: getattr(record, name) for name in expected} == expected
    assert await client.get(DOMAIN, kind, "other@example.com") is None
