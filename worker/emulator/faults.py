"""Fault injection: rules that make the next matching requests fail in one chosen way."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Literal

from worker.emulator.settings import checked_fields

Action = Literal[
    "status",          # answer `status` with {"message": ...}; optional Retry-After / X-Request-Reset
    "delay",           # hold the request `delay_s` seconds, then answer normally
    "delay_after",     # handle the request (an add is stored), then hold the answer `delay_s` seconds
    "hold",            # park the request until the test releases it, then handle it (unless its
                       # client went away meanwhile: then it is dropped unhandled)
    "hold_after",      # handle the request (an add is stored), then park the answer until released
    "drop",            # close the connection without answering
    "reset",           # send the headers and half the body, then close the connection
    "slow_body",       # send the body in small pieces, `delay_s` apart
    "malformed_json",  # a 200 whose body is not JSON
    "truncated_json",  # a 200 whose JSON is cut short (Content-Length matches the cut body)
    "items_null",      # a list page with `items: null`
    "foreign_next",    # a list page whose paging.next points at another origin
    "repeat_next",     # a list page whose paging.next is the URL just requested, forever
    "backwards_next",  # a list page whose paging.next continues after its first record, not its last
    "overlap",         # a next page that starts with the record its cursor names (inclusive cursor)
    "invalid_utf8",    # a 200 whose body is not UTF-8
    "oversized",       # a list page padded to `size_bytes`, far beyond what was asked
]
ACTIONS: tuple[str, ...] = Action.__args__  # type: ignore[attr-defined]


@dataclass(kw_only=True)
class Fault:
    """One rule. It matches on every given field and fires `times` times (None: forever),
    after letting `skip` matching requests through untouched."""

    action: Action = "status"
    status: int = 503
    times: int | None = 1
    skip: int = 0
    method: str | None = None
    domain: str | None = None
    list: str | None = None
    page: str | None = None          # the list request's `page` parameter; "" for a first page
    path_contains: str | None = None
    body_contains: str | None = None  # matched against the raw request body
    message: str | None = None
    retry_after: str | None = None   # a Retry-After header value: seconds or an HTTP date
    reset_in_ms: int | None = None   # X-Request-Reset this far ahead, with X-Request-Remaining 0
    delay_s: float = 0.0
    size_bytes: int = 64 * 1024 * 1024
    foreign_origin: str = "https://api.mailgun.example.invalid"
    probability: float = 1.0         # each matching request is hit with this chance (soak tests)

    @classmethod
    def from_json(cls, data: object) -> Fault:
        """A rule from a control request's JSON; ValueError names a field unknown or of the
        wrong type, and what it takes."""
        if isinstance(data, dict) and data.get("action", "status") not in ACTIONS:
            raise ValueError(f"unknown fault action {data.get('action')!r} "
                             f"(valid actions: {', '.join(ACTIONS)})")
        return cls(**checked_fields(cls, data, "fault fields"))

    def matches(self, method: str, path: str, domain: str | None, kind: str | None,
                page: str | None, body: bytes = b"") -> bool:
        return (
            (self.body_contains is None or self.body_contains.encode() in body)
            and
            (self.method is None or self.method.upper() == method)
            and (self.domain is None or self.domain == domain)
            and (self.list is None or self.list == kind)
            and (self.page is None or self.page == (page or ""))
            and (self.path_contains is None or self.path_contains in path)
        )


class FaultBook:
    """The active rules, first added first tried. Safe to touch from a test's thread."""

    def __init__(self) -> None:
        self._rules: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._rules.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._rules)

    def take(self, method: str, path: str, domain: str | None, kind: str | None,
             page: str | None, body: bytes = b"") -> Fault | None:
        """The rule that fires for this request, if any, counting it down."""
        with self._lock:
            for rule in self._rules:
                if not rule.matches(method, path, domain, kind, page, body):
                    continue
                if rule.probability < 1.0 and random.random() >= rule.probability:
                    continue
                if rule.skip > 0:
                    rule.skip -= 1
                    continue
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self._rules.remove(rule)
                return rule
        return None
