"""Choices for what Mailgun's public record leaves open (reference section 9), and other knobs.

Each default is the reading of the evidence the reference gives; tests and users can pick the other.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import orjson

# Fields that are an HTTP status to answer with: aiohttp refuses others, as a 500.
_HTTP_STATUS_FIELDS = frozenset({"status", "import_status"})
_HTTP_STATUSES = range(100, 600)


def _accepts(kind: Any, value: Any) -> bool:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_accepts(option, value) for option in typing.get_args(kind))
    if typing.get_origin(kind) is Literal:
        return value in typing.get_args(kind)
    if kind is type(None):
        return value is None
    if kind is float:  # JSON writes 1 and 1.0 alike
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:  # JSON's true is no count
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _expected(kind: Any) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_expected(option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(orjson.dumps(v).decode() for v in typing.get_args(kind))
    return {type(None): "null", float: "a number", int: "an integer", bool: "true or false",
            str: "a string"}[kind]


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def checked_fields(cls: type, data: object, what: str) -> dict[str, Any]:
    """A control endpoint's JSON body for the dataclass `cls`: an object of its fields, each of its
    type. ValueError names the first field that is not, and what it takes: a value of the wrong
    type taken as it is would fail every API request after it."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object of {what}, got {orjson.dumps(data).decode()}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(sorted(types_))})")
    for name, value in data.items():
        if not _accepts(types_[name], value):
            raise ValueError(f"{name}: expected {_expected(types_[name])}, "
                             f"got {orjson.dumps(value).decode()}")
        if name in _HTTP_STATUS_FIELDS and value not in _HTTP_STATUSES:
            raise ValueError(f"{name}: expected an HTTP status from 100 to 599, got {value}")
    return data


@dataclass(kw_only=True)
class EmulatorSettings:
    # List `limit`: documented maximum 1000. Above it Mailgun is believed to clamp silently
    # (unknown 3); "reject" answers 400 instead. Paging URLs echo the limit actually used.
    max_limit: int = 1000
    over_limit: Literal["clamp", "reject"] = "clamp"
    # The page past the last one: `items: []` (recorded for an empty list) or `null` (reported
    # in mailgun.js#342) (unknown 5).
    past_end_items: Literal["empty", "null"] = "empty"
    # Address case (unknown 4): stored as given and matched, sorted and cursored case-sensitively,
    # in code-point order; False folds case for matching and order.
    case_sensitive: bool = True
    # An invalid address (unknown 1): "reject" answers 400 to a single add and fails the whole
    # JSON batch that holds one; "accept" stores anything (a real list once held an address "").
    invalid_address: Literal["reject", "accept"] = "reject"
    # Add-many cap (documented 1000); a larger array is a 400 (unknown 2).
    max_batch: int = 1000
    # Fixed-window request budget per API key (X-Request-* headers). Recordings show a limit of
    # 2500 and windows about 30 s apart (unknown 6).
    rate_limit: int = 2500
    rate_window_s: float = 30.0
    # The account's domain listing (`GET /v3/domains`) has a budget of its own: "no more than 300
    # requests per minute, per account" for the Domains API (reference §5.5).
    domains_rate_limit: int = 300
    domains_rate_window_s: float = 60.0
    # Mailgun has never been seen sending Retry-After; True adds it to every 429.
    retry_after_on_429: bool = False
    # Legacy (`skip`/`total_count`) pages: "a maximum limit of 300" for v2 bounces (a Mailgun
    # staffer, reference §2.5), "(100 max)" in the legacy unsubscribes documentation; larger
    # limits are clamped.
    legacy_max_limit: int = 300
    legacy_unsubscribes_max_limit: int = 100
    # /v3 list responses: keyset `paging` (today's API) or the legacy `skip`/`total_count` form.
    # /v2 always answers in the legacy form.
    paging_style: Literal["cursor", "offset"] = "cursor"
    # CSV import: 202 in current docs, 200 in older ones.
    import_status: int = 202
    # Added to every API request, to model the round trip to Mailgun.
    latency_s: float = 0.0
    # Domains not declared answer 404 "Domain not found"; True creates any domain on first use.
    auto_create_domains: bool = False
    # Largest request body accepted (CSV imports are documented up to 25 MB).
    max_request_bytes: int = 32 * 1024 * 1024

    def update(self, changes: object) -> None:
        """Apply a partial update (the control endpoint's PATCH): all of it, or, if a name is
        unknown or a value not of its setting's type, none of it (ValueError says which)."""
        for name, value in checked_fields(type(self), changes, "emulator settings").items():
            setattr(self, name, value)
