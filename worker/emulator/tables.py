"""The emulator's data: per domain, one sorted table per suppression list, records kept in wire form."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from sortedcontainers import SortedDict

from worker.records import SuppressionList, format_timestamp, parse_timestamp

WireRecord = dict[str, Any]


class BadRecordError(ValueError):
    """A record an add request cannot store; the message is Mailgun's 400 text."""


def _wire_time(value: object) -> str:
    if value is None or value == "":
        return format_timestamp(datetime.now(UTC))
    if not isinstance(value, str):
        raise BadRecordError(f"Invalid format for parameter created_at: {value}")
    try:
        return format_timestamp(parse_timestamp(value))
    except ValueError:
        raise BadRecordError(f"Invalid format for parameter created_at: {value}") from None


def _tag_list(raw: object) -> list[str]:
    if raw is None:
        return []
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, list) or not all(isinstance(t, str) for t in values):
        raise BadRecordError(f"Invalid format for parameter tags: {raw}")
    return values


def _allowlist_entry(item: dict[str, Any]) -> tuple[object, str]:
    """A form names `address` or `domain` (address wins); a seeded record has `value` and `type`."""
    if item.get("address"):
        return item["address"], "address"
    if item.get("domain"):
        return item["domain"], "domain"
    value = item.get("value")
    if isinstance(value, str) and value:
        return value, str(item.get("type") or ("address" if "@" in value else "domain"))
    return None, "address"


def build_row(kind: SuppressionList, item: dict[str, Any]) -> WireRecord:
    """The stored wire form of an add request's record (form fields or a JSON array element)."""
    entry_type = "address"
    if kind is SuppressionList.ALLOWLIST:
        address, entry_type = _allowlist_entry(item)
    else:
        address = item.get("address")
    if address is None:
        raise BadRecordError("Missing mandatory parameter: address")
    if not isinstance(address, str):
        raise BadRecordError(f"Invalid format for parameter address: {address}")
    if kind is SuppressionList.BOUNCES:
        code = item.get("code", "550")
        row: WireRecord = {"address": address, "code": str(code) if code != "" else "550",
                           "error": str(item.get("error", "")),
                           "created_at": _wire_time(item.get("created_at"))}
        if item.get("MessageHash"):
            row["MessageHash"] = str(item["MessageHash"])
        return row
    if kind is SuppressionList.UNSUBSCRIBES:
        tags = _tag_list(item["tags"] if "tags" in item else item.get("tag"))
        return {"address": address, "tags": sorted(set(tags or ["*"])),
                "created_at": _wire_time(item.get("created_at"))}
    if kind is SuppressionList.COMPLAINTS:
        return {"address": address, "created_at": _wire_time(item.get("created_at"))}
    return {"value": address, "reason": str(item.get("reason", "")), "type": entry_type,
            "createdAt": _wire_time(item.get("createdAt") or item.get("created_at"))}


class ListTable:
    """One (domain, list): records ordered by address, the keyset cursor's order."""

    def __init__(self, kind: SuppressionList, *, case_sensitive: bool) -> None:
        self.kind = kind
        self._fold = not case_sensitive
        self._rows: SortedDict = SortedDict()

    def key(self, address: str) -> str:
        return address.lower() if self._fold else address

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, address: str) -> WireRecord | None:
        row: WireRecord | None = self._rows.get(self.key(address))
        return row

    def rows(self) -> list[WireRecord]:
        return list(self._rows.values())

    def iter_rows(self) -> Iterator[WireRecord]:
        yield from self._rows.values()

    def clear(self) -> None:
        self._rows.clear()

    def remove(self, address: str) -> WireRecord | None:
        row: WireRecord | None = self._rows.pop(self.key(address), None)
        return row

    def remove_tag(self, address: str, tag: str) -> WireRecord | None:
        """Drop one unsubscribe tag; the address goes when its last tag does."""
        row = self.get(address)
        if row is None:
            return None
        row["tags"] = [t for t in row["tags"] if t != tag]
        if not row["tags"]:
            self.remove(address)
        return row

    def upsert(self, item: dict[str, Any]) -> WireRecord:
        """Add or update one record; an unsubscribe's tags join the ones it already has."""
        row = build_row(self.kind, item)
        key_field = self.kind.address_field
        existing = self.get(row[key_field])
        if existing is not None and self.kind is SuppressionList.UNSUBSCRIBES:
            row["tags"] = sorted(set(existing["tags"]) | set(row["tags"]))
        self._rows[self.key(row[key_field])] = row
        return row

    def bulk_load(self, rows: Iterable[WireRecord]) -> None:
        """Store rows already in wire form, unchecked: for large generated lists."""
        field = self.kind.address_field
        self._rows.update((self.key(row[field]), row) for row in rows)

    def _prefix_range(self, term: str) -> tuple[int, int]:
        """Positions [lo, hi) of the keys starting with `term`: they are contiguous when sorted."""
        prefix = self.key(term)
        lo = self._rows.bisect_left(prefix)
        if not prefix or prefix[-1] == "\U0010ffff":
            return lo, len(self._rows)
        return lo, self._rows.bisect_left(prefix[:-1] + chr(ord(prefix[-1]) + 1))

    def _rows_between(self, start: int, end: int) -> list[WireRecord]:
        rows = self._rows
        return [rows[k] for k in rows.keys()[start:end]]

    def after(self, pivot: str | None, term: str, limit: int) -> list[WireRecord]:
        """The first `limit` rows after `pivot` (from the start when None) whose address has prefix `term`."""
        lo, hi = self._prefix_range(term)
        start = lo if pivot is None else max(lo, self._rows.bisect_right(self.key(pivot)))
        return self._rows_between(start, min(start + limit, hi))

    def before(self, pivot: str | None, term: str, limit: int) -> list[WireRecord]:
        """The last `limit` rows before `pivot` (up to the end when None), in ascending order."""
        lo, hi = self._prefix_range(term)
        end = hi if pivot is None else min(hi, self._rows.bisect_left(self.key(pivot)))
        return self._rows_between(max(lo, end - limit), end)

    def slice(self, skip: int, limit: int) -> list[WireRecord]:
        """Offset paging for the legacy API."""
        return self._rows_between(skip, skip + limit)


class DomainTables:
    """Every list of every declared domain."""

    def __init__(self, *, case_sensitive: bool = True) -> None:
        self.case_sensitive = case_sensitive
        self._domains: dict[str, dict[SuppressionList, ListTable]] = {}

    def declare(self, domain: str) -> dict[SuppressionList, ListTable]:
        tables = self._domains.get(domain)
        if tables is None:
            tables = {kind: ListTable(kind, case_sensitive=self.case_sensitive)
                      for kind in SuppressionList}
            self._domains[domain] = tables
        return tables

    def has(self, domain: str) -> bool:
        return domain in self._domains

    def remove(self, domain: str) -> bool:
        return self._domains.pop(domain, None) is not None

    def table(self, domain: str, kind: SuppressionList) -> ListTable:
        return self.declare(domain)[kind]

    def domains(self) -> list[str]:
        return sorted(self._domains)

    def clear(self) -> None:
        self._domains.clear()
