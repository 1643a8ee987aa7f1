"""Normalising Mailgun's varied record forms into one shape."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.records import (
    MalformedRecordError,
    Record,
    SuppressionList,
    address_problem,
    batch_item,
    form_fields,
    parse_record,
    parse_timestamp,
    staging_rows,
)

MOMENT = datetime(2011, 10, 13, 18, 2, tzinfo=UTC)


@pytest.mark.parametrize("text", [
    "Thu, 13 Oct 2011 18:02:00 UTC",
    "Thu, 13 Oct 2011 18:02:00 GMT",
    "Thu, 13 Oct 2011 18:02:00 +0000",
    "Thu, 13 Oct 2011 20:02:00 +0200",
    "2011-10-13T18:02:00.000Z",
    "13 Oct 2011 18:02:00 UTC",
])
def test_timestamps_parse_from_every_form_mailgun_uses(text):
    assert parse_timestamp(text) == MOMENT


def test_a_numeric_offset_keeps_its_instant():
    parsed = parse_timestamp("Thu, 13 Oct 2011 13:02:00 -0500")
    assert parsed == MOMENT
    assert parsed.utcoffset() == timedelta(hours=-5)
    assert parsed.tzinfo != UTC


def test_an_unreadable_timestamp_is_malformed():
    with pytest.raises(MalformedRecordError, match="unreadable timestamp"):
        parse_timestamp("yesterday-ish")


@pytest.mark.parametrize("text", [
    "Sat, 31 Feb 2026 12:00:00 UTC", "Sun, 29 Feb 2026 12:00:00 UTC", "Wed, 31 Apr 2026 12:00:00 UTC",
    "Mon, 00 Jan 2026 12:00:00 UTC", "Mon, 05 Jan 2026 24:00:00 UTC", "Mon, 05 Jan 2026 12:60:00 UTC",
    "Mon, 05 Jan 2026 12:00:60 UTC", "Mon, 05 Jan 0000 12:00:00 UTC",
])
def test_a_date_in_the_usual_form_that_does_not_exist_is_a_skipped_record(text):
    rows, skipped = staging_rows(SuppressionList.BOUNCES, [{"address": "a@example.com", "created_at": text}])
    assert [s.address for s in skipped] == ["a@example.com"]
    assert rows[0][-1] is True  # a placeholder: the mirror's row is left as it is


@pytest.mark.parametrize("text", [
    "Tue, 29 Feb 2028 12:00:00 UTC", "Mon, 01 Jan 0001 00:00:00 UTC", "Fri, 31 Dec 9999 23:59:59 GMT",
    "Thu, 30 Apr 2026 12:00:00 UTC",
])
def test_a_date_in_the_usual_form_that_exists_is_staged(text):
    rows, skipped = staging_rows(SuppressionList.BOUNCES, [{"address": "a@example.com", "created_at": text}])
    assert skipped == [] and parse_timestamp(rows[0][4] or "") == parse_timestamp(text)


@pytest.mark.parametrize("code", ["550", 550])
def test_bounce_code_is_text_whether_sent_as_string_or_number(code):
    record = parse_record(SuppressionList.BOUNCES, {"address": "a@x.com", "code": code})
    assert record.code == "550"


def test_unknown_fields_are_ignored_and_missing_ones_are_none():
    record = parse_record(SuppressionList.BOUNCES, {
        "address": "a@x.com", "MessageHash": "4e7b", "something_new": {"x": 1}})
    assert record == Record("a@x.com")


@pytest.mark.parametrize(("item", "tags"), [
    ({"address": "a@x.com", "tags": ["*", "Bar", "Survey Requests"]}, ("*", "Bar", "Survey Requests")),
    ({"address": "a@x.com", "tag": "*"}, ("*",)),
    ({"address": "a@x.com"}, ()),
])
def test_unsubscribe_tags_come_from_tags_or_the_legacy_tag(item, tags):
    assert parse_record(SuppressionList.UNSUBSCRIBES, item).tags == tags


def test_allowlist_entries_read_value_type_and_camel_case_created_at():
    record = parse_record(SuppressionList.ALLOWLIST, {
        "value": "example.org", "type": "domain", "reason": "partner",
        "createdAt": "Thu, 13 Oct 2011 18:02:00 UTC"})
    assert record == Record("example.org", MOMENT, entry_type="domain", reason="partner")


@pytest.mark.parametrize("item", [
    "a@x.com", {"code": "550"}, {"address": 12}, {"address": "a@x.com", "code": ["550"]},
    {"address": "a@x.com", "created_at": 12}, {"address": "a@x.com", "code": True},
])
def test_items_that_are_not_records_are_malformed(item):
    with pytest.raises(MalformedRecordError):
        parse_record(SuppressionList.BOUNCES, item)


def test_batch_items_carry_only_what_the_list_takes():
    record = Record("a@x.com", MOMENT, code="550", error="full", tags=("x",))
    assert batch_item(SuppressionList.BOUNCES, record) == {
        "address": "a@x.com", "code": "550", "error": "full", "created_at": "Thu, 13 Oct 2011 18:02:00 UTC"}
    assert batch_item(SuppressionList.COMPLAINTS, record) == {
        "address": "a@x.com", "created_at": "Thu, 13 Oct 2011 18:02:00 UTC"}
    assert batch_item(SuppressionList.UNSUBSCRIBES, Record("a@x.com"))["tags"] == ["*"]


def test_forms_use_singular_tag_and_allowlist_address_or_domain():
    assert form_fields(SuppressionList.UNSUBSCRIBES, Record("a@x.com", tags=("news",))) == {
        "address": "a@x.com", "tag": "news"}
    assert form_fields(SuppressionList.ALLOWLIST, Record("example.org", entry_type="domain")) == {
        "domain": "example.org"}
    assert form_fields(SuppressionList.ALLOWLIST, Record("a@x.com", reason="vip")) == {
        "address": "a@x.com", "reason": "vip"}


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.from_regex(r"[a-zA-Z0-9._%+'!-]{0,70}@[a-zA-Z0-9.-]{0,30}", fullmatch=True),
    st.text(max_size=80),
    st.sampled_from(["a@example.com", "a..b@example.com", ".a@example.com", "a.@example.com",
                     "user@localhost", "user@[127.0.0.1]", "x'); DROP TABLE mailgun.bounces;--@example.com",
                     "ünïcödé@exämple.com", "a@b", "a@-example.com", "a@example..com",
                     "a" * 65 + "@example.com", "a@" + "b" * 250 + ".com", "user@example.invalid",
                     "user@sub.example.test"]),
))
def test_address_check_gives_email_validators_verdict(address):
    try:
        validate_email(address, check_deliverability=False, allow_smtputf8=True)
        expected_valid = True
    except EmailNotValidError:
        expected_valid = False
    assert (address_problem(address) is None) == expected_valid
