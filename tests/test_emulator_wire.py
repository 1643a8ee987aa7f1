"""The emulator answers as Mailgun does on the wire (reference sections 2-5): URLs, texts, headers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support.account import API_KEY, DOMAIN
from worker.emulator import EmulatorSettings, Fault, MailgunEmulator

AUTH = {"Authorization": aiohttp.encode_basic_auth("api", API_KEY)}


@pytest.fixture
async def api(emulator: MailgunEmulator) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=emulator.base_url, headers=AUTH) as session:
        yield session


async def body(response: aiohttp.ClientResponse) -> Any:
    return await response.json(content_type=None)


def seed_bounces(emulator: MailgunEmulator, count: int) -> None:
    emulator.seed(DOMAIN, "bounces", [{"address": f"user{i:03}@example.com"} for i in range(count)])


async def test_list_page_has_recorded_paging_url_shape(emulator, api):
    seed_bounces(emulator, 3)
    response = await api.get(f"/v3/{DOMAIN}/bounces", params={"limit": "2"})
    page = await body(response)
    base = f"{emulator.base_url}/v3/{DOMAIN}/bounces"
    assert [r["address"] for r in page["items"]] == ["user000@example.com", "user001@example.com"]
    assert page["paging"] == {
        "first": f"{base}?limit=2&term=",
        "last": f"{base}?page=last&limit=2&term=",
        "next": f"{base}?page=next&address=user001%40example.com&limit=2&term=",
        "previous": f"{base}?page=previous&address=user000%40example.com&limit=2&term=",
    }
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert (await response.read()).endswith(b"}\n")


async def test_next_page_is_strictly_after_the_cursor_and_last_page_is_the_tail(emulator, api):
    seed_bounces(emulator, 5)
    page = await body(await api.get(
        f"/v3/{DOMAIN}/bounces", params={"page": "next", "address": "user001@example.com", "limit": "2"}))
    assert [r["address"] for r in page["items"]] == ["user002@example.com", "user003@example.com"]
    page = await body(await api.get(f"/v3/{DOMAIN}/bounces", params={"page": "last", "limit": "2"}))
    assert [r["address"] for r in page["items"]] == ["user003@example.com", "user004@example.com"]
    page = await body(await api.get(
        f"/v3/{DOMAIN}/bounces",
        params={"page": "previous", "address": "user003@example.com", "limit": "2"}))
    assert [r["address"] for r in page["items"]] == ["user001@example.com", "user002@example.com"]


async def test_empty_page_repeats_the_first_url_four_times(emulator, api):
    page = await body(await api.get(f"/v3/{DOMAIN}/bounces"))
    first = f"{emulator.base_url}/v3/{DOMAIN}/bounces?limit=100&term="
    assert page == {"items": [], "paging": dict.fromkeys(("first", "last", "next", "previous"), first)}


@pytest.mark.parametrize("emulator_settings", [EmulatorSettings(past_end_items="null")])
async def test_past_the_end_can_answer_items_null(emulator, api):
    seed_bounces(emulator, 1)
    page = await body(await api.get(
        f"/v3/{DOMAIN}/bounces", params={"page": "next", "address": "user000@example.com"}))
    assert page["items"] is None


async def test_limit_defaults_to_100_and_is_clamped_at_1000(emulator, api):
    seed_bounces(emulator, 1001)
    page = await body(await api.get(f"/v3/{DOMAIN}/bounces"))
    assert len(page["items"]) == 100
    page = await body(await api.get(f"/v3/{DOMAIN}/bounces", params={"limit": "5000"}))
    assert len(page["items"]) == 1000
    assert "limit=1000" in page["paging"]["next"]


@pytest.mark.parametrize("emulator_settings", [EmulatorSettings(over_limit="reject")])
async def test_limit_over_the_maximum_can_be_refused(api):
    response = await api.get(f"/v3/{DOMAIN}/bounces", params={"limit": "1001"})
    assert response.status == 400
    assert await body(response) == {"message": "Invalid parameter: limit 1001"}


async def test_term_filters_by_address_prefix(emulator, api):
    emulator.seed(DOMAIN, "complaints", [{"address": a} for a in
                                         ("ann@example.com", "bob@example.com", "bobby@example.com")])
    page = await body(await api.get(f"/v3/{DOMAIN}/complaints", params={"term": "bob"}))
    assert [r["address"] for r in page["items"]] == ["bob@example.com", "bobby@example.com"]
    assert page["paging"]["next"].endswith("&limit=100&term=bob")


async def test_wrong_key_gets_plain_text_forbidden(emulator):
    headers = {"Authorization": aiohttp.encode_basic_auth("api", "key-wrong")}
    async with aiohttp.ClientSession(base_url=emulator.base_url, headers=headers) as session:
        response = await session.get(f"/v3/{DOMAIN}/bounces")
        assert response.status == 401
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.headers["Www-Authenticate"] == 'Basic realm="MG API"'
        assert await response.text() == "Forbidden"


async def test_unknown_domain_is_404(api):
    response = await api.get("/v3/other.example.org/bounces")
    assert response.status == 404
    assert await body(response) == {"message": "Domain not found: other.example.org"}


async def test_raw_plus_in_a_path_address_is_read_as_a_space(emulator, api):
    emulator.seed(DOMAIN, "bounces", [{"address": "a+b@example.com"}])
    assert (await api.get(f"/v3/{DOMAIN}/bounces/a+b@example.com")).status == 404
    response = await api.get(f"/v3/{DOMAIN}/bounces/a%2Bb%40example.com")
    assert response.status == 200
    assert (await body(response))["address"] == "a+b@example.com"


@pytest.mark.parametrize(("kind", "form", "expected"), [
    ("bounces", {"address": "x@example.com", "code": "777", "error": "e"},
     {"message": "Address has been added to the bounces table", "address": "x@example.com"}),
    ("unsubscribes", {"address": "x@example.com", "tag": "news"},
     {"address": "x@example.com", "message": "Address has been added to the unsubscribes table"}),
    ("complaints", {"address": "x@example.com"},
     {"address": "x@example.com", "message": "Address has been added to the complaints table"}),
    ("whitelists", {"domain": "example.org"},
     {"message": "Address/Domain has been added to the whitelists table", "type": "domain",
      "value": "example.org"}),
])
async def test_add_one_answers_with_the_recorded_message(api, kind, form, expected):
    response = await api.post(f"/v3/{DOMAIN}/{kind}", data=form)
    assert response.status == 200
    assert await body(response) == expected


@pytest.mark.parametrize(("kind", "message"), [
    ("bounces", "2 addresses have been added to the bounces table"),
    ("unsubscribes", "2 addresses have been added to the unsubscribes table"),
    ("complaints", "2 complaint addresses have been added to the complaints table"),
])
async def test_add_many_answers_with_the_recorded_message(api, kind, message):
    response = await api.post(f"/v3/{DOMAIN}/{kind}",
                              json=[{"address": "a@example.com"}, {"address": "b@example.com"}])
    assert await body(response) == {"message": message}


async def test_add_many_stores_codes_as_text_and_timestamps_in_utc_form(emulator, api):
    await api.post(f"/v3/{DOMAIN}/bounces", json=[
        {"address": "a@example.com", "code": 550, "created_at": "Thu, 13 Oct 2011 18:02:00 +0000"}])
    [record] = emulator.records(DOMAIN, "bounces")
    assert record == {"address": "a@example.com", "code": "550", "error": "",
                      "created_at": "Thu, 13 Oct 2011 18:02:00 UTC"}


async def test_batch_over_1000_records_is_refused(emulator, api):
    response = await api.post(f"/v3/{DOMAIN}/bounces",
                              json=[{"address": f"u{i}@example.com"} for i in range(1001)])
    assert response.status == 400
    assert "1001" in (await body(response))["message"]
    assert emulator.records(DOMAIN, "bounces") == []


async def test_one_invalid_address_fails_the_whole_batch(emulator, api):
    response = await api.post(f"/v3/{DOMAIN}/bounces",
                              json=[{"address": "good@example.com"}, {"address": "not-an-address"}])
    assert response.status == 400
    assert await body(response) == {"message": "Invalid format for parameter address: not-an-address"}
    assert emulator.records(DOMAIN, "bounces") == []


async def test_form_add_without_address_names_the_missing_parameter(api):
    response = await api.post(f"/v3/{DOMAIN}/complaints", data={"created_at": "x"})
    assert response.status == 400
    assert await body(response) == {"message": "Missing mandatory parameter: address"}


async def test_unsubscribe_tags_merge_and_one_tag_can_be_removed(emulator, api):
    await api.post(f"/v3/{DOMAIN}/unsubscribes", data={"address": "u@example.com", "tag": "news"})
    await api.post(f"/v3/{DOMAIN}/unsubscribes", data={"address": "u@example.com", "tags": "ignored"})
    [record] = emulator.records(DOMAIN, "unsubscribes")
    assert record["tags"] == ["*", "news"]
    response = await api.delete(f"/v3/{DOMAIN}/unsubscribes/u%40example.com", params={"tag": "news"})
    assert await body(response) == {"address": "u@example.com",
                                    "message": "Unsubscribe event has been removed"}
    assert emulator.records(DOMAIN, "unsubscribes")[0]["tags"] == ["*"]


@pytest.mark.parametrize(("kind", "removed", "missing"), [
    ("bounces", "Bounced address has been removed", "Address not found in bounces table"),
    ("unsubscribes", "Unsubscribe event has been removed", "Address not found in unsubscribers table"),
    ("complaints", "Spam complaint has been removed", "No spam complaints found for this address"),
])
async def test_delete_one_and_its_404(emulator, api, kind, removed, missing):
    emulator.seed(DOMAIN, kind, [{"address": "d@example.com"}])
    response = await api.delete(f"/v3/{DOMAIN}/{kind}/d%40example.com")
    assert await body(response) == {"address": "d@example.com", "message": removed}
    response = await api.delete(f"/v3/{DOMAIN}/{kind}/d%40example.com")
    assert response.status == 404
    assert await body(response) == {"message": missing}


@pytest.mark.parametrize(("kind", "message"), [
    ("bounces", "Bounced addresses for this domain have been removed"),
    ("unsubscribes", "Unsubscribe addresses for this domain have been removed"),
    ("complaints", "Complaint addresses for this domain have been removed"),
    ("whitelists", "Whitelist addresses/domains for this domain have been removed"),
])
async def test_delete_all(emulator, api, kind, message):
    emulator.seed(DOMAIN, kind, [{"address": "d@example.com"}])
    assert await body(await api.delete(f"/v3/{DOMAIN}/{kind}")) == {"message": message}
    assert emulator.records(DOMAIN, kind) == []


async def test_allowlist_records_use_value_type_and_camel_case_created_at(emulator, api):
    await api.post(f"/v3/{DOMAIN}/whitelists", data={"address": "vip@example.com", "reason": "ceo"})
    page = await body(await api.get(f"/v3/{DOMAIN}/whitelists"))
    [item] = page["items"]
    assert set(item) == {"value", "reason", "type", "createdAt"}
    assert (item["value"], item["type"], item["reason"]) == ("vip@example.com", "address", "ceo")
    response = await api.get(f"/v3/{DOMAIN}/whitelists/nobody%40example.com")
    assert await body(response) == {"message": "Address/Domain not found in whitelists table"}
    response = await api.delete(f"/v3/{DOMAIN}/whitelists/vip%40example.com")
    assert await body(response) == {"message": "Whitelist address/domain has been removed",
                                    "value": "vip@example.com"}


async def test_csv_import_is_accepted_with_202(emulator, api):
    form = aiohttp.FormData()
    form.add_field("file", b"address,code,error\nimp@example.com,551,full\n", filename="b.csv")
    response = await api.post(f"/v3/{DOMAIN}/bounces/import", data=form)
    assert response.status == 202
    assert await body(response) == {"message": "file uploaded successfully"}
    assert emulator.records(DOMAIN, "bounces")[0]["code"] == "551"


@pytest.mark.parametrize("emulator_settings", [EmulatorSettings(rate_limit=3)])
async def test_request_budget_headers_count_down_then_429(api):
    remaining = []
    for _ in range(3):
        response = await api.get(f"/v3/{DOMAIN}/bounces")
        assert response.headers["X-Request-Limit"] == "3"
        remaining.append(int(response.headers["X-Request-Remaining"]))
        reset = int(response.headers["X-Request-Reset"])
    assert remaining == [2, 1, 0]
    response = await api.get(f"/v3/{DOMAIN}/complaints")
    assert response.status == 429
    assert int(response.headers["X-Request-Reset"]) == reset
    assert "Rate Limited" in (await body(response))["message"]


async def test_legacy_v2_lists_use_skip_and_total_count(emulator, api):
    emulator.seed(DOMAIN, "bounces", [{"address": "a@example.com", "code": 550},
                                      {"address": "b@example.com", "code": "5.1.1"}])
    emulator.seed(DOMAIN, "unsubscribes", [{"address": "u@example.com", "tags": ["*", "news"]}])
    page = await body(await api.get(f"/v2/{DOMAIN}/bounces", params={"skip": "1", "limit": "1"}))
    assert page["total_count"] == 2
    assert "paging" not in page
    assert page["items"][0]["address"] == "b@example.com"
    page = await body(await api.get(f"/v2/{DOMAIN}/bounces"))
    assert [item["code"] for item in page["items"]] == [550, "5.1.1"]
    page = await body(await api.get(f"/v2/{DOMAIN}/unsubscribes"))
    assert page["total_count"] == 2
    assert [(i["address"], i["tag"]) for i in page["items"]] == [
        ("u@example.com", "*"), ("u@example.com", "news")]


async def test_control_endpoint_seeds_injects_faults_and_logs_requests(emulator, api):
    async with aiohttp.ClientSession(base_url=emulator.base_url) as control:
        seeded = await control.post("/_emulator/seed", json={
            "domains": {DOMAIN: {"complaints": [{"address": "c@example.com"}]}}})
        assert seeded.status == 200
        fault = await control.post("/_emulator/faults", json={"status": 503, "list": "complaints"})
        assert fault.status == 200
        assert (await api.get(f"/v3/{DOMAIN}/complaints")).status == 503
        assert (await api.get(f"/v3/{DOMAIN}/complaints")).status == 200
        log = await (await control.get("/_emulator/requests")).json()
        assert [(r["method"], r["status"]) for r in log] == [("GET", 503), ("GET", 200)]
        assert all(r["authorized"] for r in log)
        bad = await control.post("/_emulator/faults", json={"action": "explode"})
        assert bad.status == 400
        state = await (await control.get("/_emulator/state")).json()
        assert state["domains"][DOMAIN]["complaints"] == 1


@pytest.mark.parametrize(("method", "path", "sent", "said"), [
    ("PATCH", "/_emulator/settings", {"latency_s": "slow"}, 'latency_s: expected a number, got "slow"'),
    ("PATCH", "/_emulator/settings", {"case_sensitive": 1}, "case_sensitive: expected true or false"),
    ("PATCH", "/_emulator/settings", {"over_limit": "drop"}, 'over_limit: expected one of "clamp", "reject"'),
    ("PATCH", "/_emulator/settings", {"latency_s": 0.5, "rate_limit": "many"},
     "rate_limit: expected an integer"),
    ("PATCH", "/_emulator/settings", [1], "expected a JSON object of emulator settings, got [1]"),
    ("PATCH", "/_emulator/settings", 5, "expected a JSON object of emulator settings, got 5"),
    ("PATCH", "/_emulator/settings", None, "expected a JSON object of emulator settings, got null"),
    ("POST", "/_emulator/faults", {"times": "x"}, 'times: expected an integer or null, got "x"'),
    ("POST", "/_emulator/faults", {"status": "abc"}, 'status: expected an integer, got "abc"'),
    ("POST", "/_emulator/faults", {"status": 5}, "status: expected an HTTP status from 100 to 599, got 5"),
    ("POST", "/_emulator/faults", {"delay_s": [1]}, "delay_s: expected a number, got [1]"),
    ("POST", "/_emulator/faults", [1], "expected a JSON object of fault fields, got [1]"),
])
async def test_a_control_body_of_the_wrong_type_is_refused_naming_the_field_and_the_api_keeps_answering(
        emulator, api, method, path, sent, said):
    before = await (await api.get("/_emulator/state")).json()
    async with aiohttp.ClientSession(base_url=emulator.base_url) as control, \
            control.request(method, path, data=orjson.dumps(sent)) as answer:
        assert answer.status == 400, await answer.text()
        assert said in (await answer.json())["message"]
    after = await (await api.get("/_emulator/state")).json()
    assert (after["settings"], after["faults"]) == (before["settings"], before["faults"])  # none of it
    assert (await api.get(f"/v3/{DOMAIN}/bounces")).status == 200


async def test_a_held_request_waits_for_release_and_one_held_after_is_stored_first(emulator, api):
    emulator.inject(Fault(action="hold", method="POST", list="bounces"))
    emulator.inject(Fault(action="hold_after", method="POST", list="complaints"))
    before = asyncio.ensure_future(api.post(f"/v3/{DOMAIN}/bounces", json=[{"address": "b@example.com"}]))
    after = asyncio.ensure_future(api.post(f"/v3/{DOMAIN}/complaints", json=[{"address": "c@example.com"}]))
    async with asyncio.timeout(5):
        held = await emulator.until_held(2)

    assert sorted(r.path for r in held) == [f"/v3/{DOMAIN}/bounces", f"/v3/{DOMAIN}/complaints"]
    assert emulator.records(DOMAIN, "bounces") == []  # parked before it was handled
    assert [r["address"] for r in emulator.records(DOMAIN, "complaints")] == ["c@example.com"]
    assert not before.done() and not after.done()
    assert emulator.release() == 2
    assert [(await before).status, (await after).status] == [200, 200]
    assert [r["address"] for r in emulator.records(DOMAIN, "bounces")] == ["b@example.com"]
    assert emulator.held == []


async def test_a_held_request_whose_client_went_away_is_never_handled(emulator):
    emulator.inject(Fault(action="hold", method="POST"))
    async with aiohttp.ClientSession(base_url=emulator.base_url, headers=AUTH) as gone:
        post = asyncio.ensure_future(gone.post(f"/v3/{DOMAIN}/bounces", json=[{"address": "b@example.com"}]))
        await emulator.until_held()
        post.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await post
    await asyncio.sleep(0.05)
    emulator.release()
    await asyncio.sleep(0.05)
    assert emulator.records(DOMAIN, "bounces") == []


async def test_the_control_endpoint_releases_held_requests(emulator, api):
    emulator.inject(Fault(action="hold", method="GET"))
    page = asyncio.ensure_future(api.get(f"/v3/{DOMAIN}/bounces"))
    await emulator.until_held()
    async with aiohttp.ClientSession(base_url=emulator.base_url) as control:
        assert (await (await control.get("/_emulator/state")).json())["held"] == 1
        assert await (await control.post("/_emulator/release")).json() == {"released": 1}
    assert (await page).status == 200


async def test_control_endpoint_declares_and_removes_a_domain_of_the_listing(emulator, api):
    async def listed() -> list[str]:
        return [item["name"] for item in (await body(await api.get("/v3/domains")))["items"]]

    async with aiohttp.ClientSession(base_url=emulator.base_url) as control:
        assert (await control.post("/_emulator/domains/mg.other.example.com")).status == 200
        assert "mg.other.example.com" in await listed()
        assert (await control.delete("/_emulator/domains/mg.other.example.com")).status == 200
        assert "mg.other.example.com" not in await listed()
        assert (await api.get("/v3/mg.other.example.com/bounces")).status == 404
        assert (await control.delete("/_emulator/domains/mg.other.example.com")).status == 404


# Reference §2.5 (line 144): GO14 decoded GET /v2/<domain>/bounces/<addr> as {"bounce": {...}};
# line 149: a v2 complaint came wrapped, with its count; line 148: an unsubscribe as a list envelope.
async def test_v2_single_record_gets_answer_in_the_v2_shapes(emulator, api):
    emulator.seed(DOMAIN, "bounces", [{"address": "a@example.com", "code": "550"}])
    emulator.seed(DOMAIN, "complaints", [{"address": "baz@example.com"}])
    emulator.seed(DOMAIN, "unsubscribes", [{"address": "u@example.com", "tags": ["*", "news"]}])
    bounce = await body(await api.get(f"/v2/{DOMAIN}/bounces/a@example.com"))
    assert list(bounce) == ["bounce"]
    assert (bounce["bounce"]["address"], bounce["bounce"]["code"]) == ("a@example.com", 550)
    complaint = await body(await api.get(f"/v2/{DOMAIN}/complaints/baz@example.com"))
    assert list(complaint) == ["complaint"] and complaint["complaint"]["count"] == 1
    unsubscribe = await body(await api.get(f"/v2/{DOMAIN}/unsubscribes/u@example.com"))
    assert unsubscribe["total_count"] == 2
    assert [i["tag"] for i in unsubscribe["items"]] == ["*", "news"]
    v3 = await body(await api.get(f"/v3/{DOMAIN}/bounces/a@example.com"))
    assert v3["address"] == "a@example.com"


# Reference §2.5 (line 150): "Version 2 of our Bounce API only allowed a maximum limit of 300";
# line 148: the legacy unsubscribes documentation says "(100 max)".
async def test_v2_pages_are_capped_at_300_and_unsubscribes_at_100(emulator, api):
    seed_bounces(emulator, 1200)
    emulator.seed(DOMAIN, "unsubscribes", [{"address": f"u{i:03}@example.com"} for i in range(150)])
    page = await body(await api.get(f"/v2/{DOMAIN}/bounces", params={"limit": "1000"}))
    assert (len(page["items"]), page["total_count"]) == (300, 1200)
    page = await body(await api.get(f"/v2/{DOMAIN}/unsubscribes", params={"limit": "1000"}))
    assert len(page["items"]) == 100
    page = await body(await api.get(f"/v3/{DOMAIN}/bounces", params={"limit": "1000"}))
    assert len(page["items"]) == 1000


# Reference §5.2 (line 301): a 401 is text/plain "Forbidden" with Www-Authenticate: Basic realm="MG API".
async def test_an_injected_401_is_the_recorded_one(emulator, api):
    emulator.fail_next(401)
    response = await api.get(f"/v3/{DOMAIN}/bounces")
    assert response.status == 401
    assert response.headers["Www-Authenticate"] == 'Basic realm="MG API"'
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert await response.read() == b"Forbidden"


# Reference §5.5 (line 329): the Domains API has its own limit, "no more than 300 requests per
# minute, per account": the account's domain listing does not spend the suppression lists' budget.
async def test_the_domain_listing_has_a_budget_of_its_own(emulator, api):
    listed = await api.get("/v3/domains")
    assert listed.headers["X-Request-Limit"] == "300"
    assert listed.headers["X-Request-Remaining"] == "299"
    page = await api.get(f"/v3/{DOMAIN}/bounces")
    assert page.headers["X-Request-Remaining"] == str(emulator.settings.rate_limit - 1)
