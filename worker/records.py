"""Suppression records: the lists, parsing Mailgun's JSON, a page of a list as read, and the payloads
sent back. No I/O.

Mailgun's wire forms vary by list and by era (see the API reference): `code` comes as "550" or 550,
timestamps as `... UTC`, `... GMT` or `... +0000`, unsubscribe tags as `tags: [...]` or a legacy
`tag`, and the allowlist uses `value`/`type`/`createdAt`. Everything is normalised here, once.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from email_validator import EmailNotValidError, validate_email


class SuppressionList(enum.StrEnum):
    """A suppression list of a sending domain; the value is its path segment in the API."""

    BOUNCES = "bounces"
    UNSUBSCRIBES = "unsubscribes"
    COMPLAINTS = "complaints"
    ALLOWLIST = "allowlist"

    @property
    def path(self) -> str:
        """The list's segment in Mailgun's URLs: the allowlist is still `whitelists` there."""
        return "whitelists" if self is SuppressionList.ALLOWLIST else self.value

    @property
    def address_field(self) -> str:
        """The field naming a record's address, on the wire and in the mirror: the allowlist's
        `value` may be an address or a domain."""
        return "value" if self is SuppressionList.ALLOWLIST else "address"

    @property
    def accepts_batches(self) -> bool:
        """Whether Mailgun takes a JSON array of records (the allowlist takes one form post each)."""
        return self is not SuppressionList.ALLOWLIST

    @classmethod
    def from_path(cls, segment: str) -> SuppressionList:
        """The list a URL segment names; ValueError for anything Mailgun does not serve."""
        for kind in cls:
            if kind.path == segment:
                return kind
        raise ValueError(f"{segment!r} is not a suppression list")

    @classmethod
    def parse(cls, name: str) -> SuppressionList:
        """The list's name, or its URL segment (`whitelists`)."""
        try:
            return cls(name)
        except ValueError:
            return cls.from_path(name)


# Every list the worker mirrors, in the order it reconciles them.
SYNCED_LISTS = tuple(SuppressionList)


@dataclass(frozen=True, slots=True)
class ListRef:
    """One list of one sending domain: what a run locks and reconciles, and logs and messages name."""

    domain: str
    list: SuppressionList

    def __str__(self) -> str:
        """As messages name it: `mg.example.com bounces`."""
        return f"{self.domain} {self.list.value}"

    @property
    def labels(self) -> dict[str, str]:
        """Its fields in log lines and its labels in metrics."""
        return {"domain": self.domain, "list": self.list.value}

# The largest JSON array Mailgun accepts in one add-many request.
MAX_BATCH = 1000


class MalformedRecordError(ValueError):
    """A list item that is not a suppression record."""


class UnholdableRecordError(MalformedRecordError):
    """A record in the API's shape whose values the mirror cannot hold (an empty or overlong
    address, a NUL, a date nobody can read): Mailgun has it, so it is skipped, not a broken page."""


@dataclass(frozen=True, slots=True)
class SkippedRecord:
    """A record left out of a pull. `held` when its address fits the mirror: it was staged as a
    placeholder, so the mirror's row of that address is neither removed nor changed."""

    address: str
    reason: str
    held: bool


# RFC 5321 caps a mailbox at 254 characters; anything far beyond is not an address, and a key
# that long would not fit PostgreSQL's index rows.
MAX_ADDRESS = 512


def _checked_address(address: str) -> str:
    if not address:
        raise UnholdableRecordError("an empty address")
    if len(address) > MAX_ADDRESS:
        raise UnholdableRecordError(f"an address of {len(address)} characters (at most {MAX_ADDRESS})")
    if "\x00" in address:
        raise UnholdableRecordError(f"the address {address[:80]!r} holds a NUL character")
    return address


@dataclass(frozen=True, slots=True)
class Record:
    """One suppression as the worker sees it, whatever list it came from.

    `address` is the allowlist's `value` too: an address or, with `entry_type == "domain"`, a domain
    (`entry_type` is an allowlist entry's `type`, `address` or `domain`; None on the other lists).
    """

    address: str
    created_at: datetime | None = None
    code: str | None = None
    error: str | None = None
    tags: tuple[str, ...] = ()
    entry_type: str | None = None
    reason: str | None = None


_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_UTC_NAMES = frozenset({"UTC", "GMT", "+0000", "-0000", "Z", "UT"})


def parse_timestamp(text: str) -> datetime:
    """Parse Mailgun's RFC 2822 timestamps (`UTC`, `GMT` or a numeric offset), or ISO 8601.

    The usual form `Thu, 26 Mar 2026 12:59:15 UTC` takes a fast path: the general parser costs
    several microseconds a value, which adds up over a million records.
    """
    parts = text.split()
    if len(parts) == 6 and parts[5] in _UTC_NAMES and parts[2] in _MONTHS:
        fields = [parts[3], parts[1], *parts[4].split(":")]
        if len(fields) == 5 and all(f.isascii() and f.isdigit() for f in fields):
            year, day, hour, minute, second = map(int, fields)
            try:
                return datetime(year, _MONTHS[parts[2]], day, hour, minute, second, tzinfo=UTC)
            except ValueError:
                # The general parser would read year 0000 as 2000: a date in this form that does
                # not exist is unreadable, not another date.
                raise UnholdableRecordError(f"a date that does not exist {text[:80]!r}") from None
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise UnholdableRecordError(f"unreadable timestamp {text[:80]!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_timestamp(moment: datetime) -> str:
    """Render a timestamp the way Mailgun's v3 API does: `Thu, 26 Mar 2026 12:59:15 UTC`."""
    return moment.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S UTC")


def _text(item: Mapping[str, Any], key: str) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise MalformedRecordError(f"field {key!r} is {type(value).__name__}, expected text")
    return str(value)


def _timestamp(item: Mapping[str, Any], key: str) -> datetime | None:
    value = item.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MalformedRecordError(f"field {key!r} is {type(value).__name__}, expected a date")
    return parse_timestamp(value)


def _tags(item: Mapping[str, Any]) -> tuple[str, ...]:
    raw = item.get("tags")
    if raw is None:
        raw = item.get("tag")
    if raw is None:
        return ()
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, list) or not all(isinstance(t, str) for t in values):
        raise MalformedRecordError("field 'tags' is not a list of text")
    if any("\x00" in t for t in values):
        raise UnholdableRecordError("field 'tags' holds a NUL character")
    return tuple(sorted(set(values)))


def parse_record(kind: SuppressionList, item: object) -> Record:
    """Normalise one list item; unknown fields are ignored, missing optional ones are None."""
    if not isinstance(item, Mapping):
        raise MalformedRecordError(f"list item is {type(item).__name__}, expected an object")
    key = kind.address_field
    address = item.get(key)
    if not isinstance(address, str):
        raise MalformedRecordError(f"list item has no text {key!r}")
    _checked_address(address)
    if kind is SuppressionList.BOUNCES:
        return Record(address, _timestamp(item, "created_at"),
                      code=_text(item, "code"), error=_text(item, "error"))
    if kind is SuppressionList.UNSUBSCRIBES:
        return Record(address, _timestamp(item, "created_at"), tags=_tags(item))
    if kind is SuppressionList.COMPLAINTS:
        return Record(address, _timestamp(item, "created_at"))
    return Record(address, _timestamp(item, "createdAt") or _timestamp(item, "created_at"),
                  entry_type=_entry_type(item), reason=_text(item, "reason"))


def single_item(kind: SuppressionList, payload: object) -> object:
    """The record in the answer to a single GET: v3 answers it bare; v2 wrapped a bounce as
    `{"bounce": {...}}` and a complaint as `{"complaint": {...}}`, and answered an unsubscribe
    with its rows, one per tag, as a list (`total_count`, `items`)."""
    if not isinstance(payload, Mapping) or kind.address_field in payload:
        return payload
    wrapper = {SuppressionList.BOUNCES: "bounce", SuppressionList.COMPLAINTS: "complaint"}.get(kind)
    if wrapper is not None and isinstance(payload.get(wrapper), Mapping):
        return payload[wrapper]
    items = payload.get("items")
    if kind is SuppressionList.UNSUBSCRIBES and isinstance(items, list) and items \
            and all(isinstance(item, Mapping) for item in items):
        tags: list[object] = []
        for item in items:
            found = item.get("tags", item.get("tag"))
            tags += found if isinstance(found, list) else [found]
        return {**items[0], "tags": tags}
    return payload


# The staging form of a record: (key, address, code, error, created_at, tags, skipped). The key is the
# address with its ASCII letters lower-cased, as the mirror's address_key (lower() under COLLATE
# "C"); computed here for ASCII addresses, None otherwise (PostgreSQL fills it in). created_at
# stays text for PostgreSQL to cast: Mailgun's usual form passes through untouched, anything else
# is parsed and rendered as ISO 8601, so a million records cost no datetime objects in Python.
# `skipped` marks the placeholder of a record the mirror cannot hold (its other fields are None).
StagingRow = tuple[str | None, str, str | None, str | None, str | None, list[str] | None, bool]

# Mailgun's usual form of a date that exists, which PostgreSQL casts as it is: a day the month
# always has (29 February, which needs the year, goes through `parse_timestamp`), an hour up to 23,
# a year from 0001. A date of this shape that does not exist would fail the whole list's cast.
_USUAL_TIMESTAMP = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), "
    r"(?:(?:0[1-9]|1[0-9]|2[0-8]) (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    r"|(?:29|30) (?:Jan|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    r"|31 (?:Jan|Mar|May|Jul|Aug|Oct|Dec)) "
    r"(?!0000)[0-9]{4} (?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9] (?:UTC|GMT)\Z", re.ASCII).match


def _timestamp_text(value: object, key: str) -> str | None:
    if value is None or value == "":
        return None
    if type(value) is str:
        return value if _USUAL_TIMESTAMP(value) else parse_timestamp(value).isoformat()
    raise MalformedRecordError(f"field {key!r} is {type(value).__name__}, expected a date")


def _staging_text(value: object, key: str) -> str | None:
    if type(value) is str:
        if "\x00" in value:
            raise UnholdableRecordError(f"field {key!r} holds a NUL character")
        return value
    if value is None:
        return value
    if type(value) is int or type(value) is float:
        return str(value)
    raise MalformedRecordError(f"field {key!r} is {type(value).__name__}, expected text")


def _fits_mirror(address: str) -> bool:
    return 0 < len(address) <= MAX_ADDRESS and "\x00" not in address


def staging_rows(kind: SuppressionList, items: list[Any]) -> tuple[list[StagingRow], list[SkippedRecord]]:
    """Normalise a page's items into staging rows, checking each as `parse_record` does; and the
    records skipped because the mirror cannot hold them. An item not in the API's shape (not an
    object, no text address, a field of another JSON type) raises: the page cannot be trusted.

    The usual values (text codes, Mailgun's timestamp form) are tested inline: this runs for
    every record of every pull.
    """
    key = kind.address_field
    bounces = kind is SuppressionList.BOUNCES
    rows: list[StagingRow] = []
    skipped: list[SkippedRecord] = []
    append = rows.append
    usual = _USUAL_TIMESTAMP
    for item in items:
        if type(item) is not dict:
            raise MalformedRecordError(f"list item is {type(item).__name__}, expected an object")
        address = item.get(key)
        if type(address) is not str:
            raise MalformedRecordError(f"list item has no text {key!r}")
        lowered = address.lower() if address.isascii() else None
        try:
            if not address or len(address) > MAX_ADDRESS or "\x00" in address:
                _checked_address(address)
            created = item.get("created_at") if kind is not SuppressionList.ALLOWLIST \
                else item.get("createdAt", item.get("created_at"))
            if type(created) is not str or not usual(created):
                created = _timestamp_text(created, "created_at")
            if bounces:
                code, error = item.get("code"), item.get("error")
                if type(code) is not str or "\x00" in code:
                    code = _staging_text(code, "code")
                if type(error) is not str or "\x00" in error:
                    error = _staging_text(error, "error")
                append((lowered, address, code, error, created, None, False))
            elif kind is SuppressionList.UNSUBSCRIBES:
                tags = _tags(item)
                append((lowered, address, None, None, created, list(tags) if tags else None, False))
            elif kind is SuppressionList.COMPLAINTS:
                append((lowered, address, None, None, created, None, False))
            else:
                append((lowered, address, _entry_type(item), _staging_text(item.get("reason"), "reason"),
                        created, None, False))
        except UnholdableRecordError as exc:
            held = _fits_mirror(address)
            skipped.append(SkippedRecord(address, str(exc), held))
            if held:
                append((lowered, address, None, None, None, None, True))
    return rows, skipped


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list in the server's order: its items as received, checked and normalised
    into staging rows (placeholders of held skipped records among them), the records skipped
    because the mirror cannot hold them, and the URL it came from."""

    number: int
    url: str
    kind: SuppressionList
    items: list[Any]
    rows: list[StagingRow]
    skipped: list[SkippedRecord] = field(default_factory=list)

    @property
    def records(self) -> list[Record]:
        """The records the mirror can hold."""
        found = []
        for item in self.items:
            try:
                found.append(parse_record(self.kind, item))
            except UnholdableRecordError:
                continue
        return found

    @property
    def held(self) -> int:
        """How many of the page's records the mirror takes (placeholders not counted)."""
        return len(self.rows) - sum(1 for s in self.skipped if s.held)

    @property
    def last_address(self) -> str:
        """The address of the page's last record, where the next page continues."""
        return str(self.items[-1][self.kind.address_field])


def _entry_type(item: Mapping[str, Any]) -> str:
    """An allowlist entry's `type`: the mirror knows `address` and `domain` only."""
    entry = _staging_text(item.get("type"), "type") or "address"
    if entry not in ("address", "domain"):
        raise UnholdableRecordError(f"an allowlist entry of type {entry[:40]!r}")
    return entry


def batch_item(kind: SuppressionList, record: Record) -> dict[str, Any]:
    """One element of an add-many JSON array (bounces, unsubscribes, complaints)."""
    item: dict[str, Any] = {"address": record.address}
    if kind is SuppressionList.BOUNCES:
        if record.code is not None:
            item["code"] = record.code
        if record.error is not None:
            item["error"] = record.error
    elif kind is SuppressionList.UNSUBSCRIBES:
        item["tags"] = list(record.tags) or ["*"]
    if record.created_at is not None:
        item["created_at"] = format_timestamp(record.created_at)
    return item


def form_fields(kind: SuppressionList, record: Record) -> dict[str, str]:
    """The form of a single add; the allowlist knows no other way to add."""
    if kind is SuppressionList.ALLOWLIST:
        fields = {"domain" if record.entry_type == "domain" else "address": record.address}
        if record.reason:
            fields["reason"] = record.reason
        return fields
    fields = {k: str(v) for k, v in batch_item(kind, record).items() if not isinstance(v, list)}
    if kind is SuppressionList.UNSUBSCRIBES:
        # A form add takes one `tag`; a plural `tags` field is silently ignored by Mailgun.
        fields["tag"] = record.tags[0] if record.tags else "*"
    return fields


# An ASCII dot-atom local part: email-validator accepts every one of these (up to 64 characters),
# so for such addresses only the domain needs its full check, and domains repeat a great deal.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z").match


def _full_check(address: str) -> str | None:
    try:
        validate_email(address, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        return f"invalid address: {exc}"
    return None


@functools.lru_cache(maxsize=65536)
def _domain_problem(domain: str) -> str | None:
    return _full_check(f"postmaster@{domain}")


def record_problem(kind: SuppressionList, record: Record) -> str | None:
    """Why a local addition cannot be sent, or None: an allowlist entry may name a whole domain."""
    if kind is SuppressionList.ALLOWLIST and record.entry_type == "domain":
        problem = _domain_problem(record.address)
        return problem and problem.replace("invalid address", "invalid domain", 1)
    return address_problem(record.address)


def address_problem(address: str) -> str | None:
    """Why an address cannot be a suppression, or None. Syntax only: no DNS, one row at a time.

    The verdict is email-validator's; the usual address takes a shortcut to the same verdict
    (about 40 microseconds an address otherwise, which a 100,000-row push would feel).
    """
    local, at, domain = address.rpartition("@")
    if at and address.isascii() and len(address) <= 254 and len(local) <= 64 and _DOT_ATOM(local):
        return _domain_problem(domain)
    return _full_check(address)
