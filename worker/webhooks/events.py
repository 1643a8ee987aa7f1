"""Mailgun webhooks: verify a delivery's signature and turn its event into a mirror row. No I/O.

A delivery is a JSON object `{"signature": {timestamp, token, signature}, "event-data": {...}}`;
the signature is the hex HMAC-SHA256 of `timestamp + token` under the account's webhook signing
key. What is refused says why, as the answer Mailgun gets: 401 (WebhookAuthError) for a missing,
wrong or stale signature, so Mailgun keeps retrying while a misconfigured key is fixed; 406
(WebhookPayloadError) for a payload that can never be stored, so Mailgun stops.

Reading is in two steps: `authenticate` (the body and its signature, nothing else) and
`read_signed` (the event). The signature does not cover `event-data`, so every delivery that
passes the first step must use its token up, whatever the second says (see writer).

Events kept: `failed` with severity `permanent` (bounces), `complained` (complaints) and
`unsubscribed` (unsubscribes, with the message's tags, `*` when it has none). Everything else is
`Ignored` and answered 200, so Mailgun does not retry it: temporary failures, the other events,
and permanent failures that are only drops because the address is already on a list (reason
`suppress-bounce`, `suppress-complaint`, `suppress-unsubscribe`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import Any

import orjson

from worker.errors import UnknownDomainError, WebhookAuthError, WebhookPayloadError
from worker.records import MAX_ADDRESS, SuppressionList, address_problem

# Event names as they appear in metrics; anything else counts as "other" (labels stay bounded).
EVENTS = ("accepted", "clicked", "complained", "delivered", "failed", "opened", "rejected", "stored",
          "unsubscribed")

# Seconds since the epoch as Mailgun writes them in a signature: digits, no sign, point or exponent.
WHOLE_SECONDS = re.compile(r"[1-9][0-9]{0,11}")
_STORAGE_DOMAIN = re.compile(r"/v3/domains/(?P<domain>[^/]+)/messages/")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _clean(text: str) -> str:
    """PostgreSQL text cannot hold NUL."""
    return text.replace("\x00", "")


def address_key(address: str) -> str:
    """The mirror's `address_key`: ASCII letters folded, as PostgreSQL's lower(... COLLATE "C")."""
    return address.translate(_ASCII_LOWER)


def sign(key: str, timestamp: str, token: str) -> str:
    """The signature Mailgun sends: hex HMAC-SHA256 of timestamp + token, no separator."""
    return hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One event to write into the mirror."""

    kind: SuppressionList
    event: str
    domain: str
    address: str
    # When it happened, to the fraction of a second Mailgun gives: weighed against an
    # application's removal of the address, which may fall in the same second.
    occurred_at: datetime
    token: str
    signed_at: datetime
    event_id: str
    code: str | None = None
    error: str | None = None
    tags: tuple[str, ...] = ()

    @property
    def created_at(self) -> datetime:
        """The record's time: Mailgun keeps whole seconds on its records."""
        return self.occurred_at.replace(microsecond=0)

    @property
    def key(self) -> tuple[SuppressionList, str, str]:
        return self.kind, self.domain, address_key(self.address)


@dataclass(frozen=True, slots=True)
class Signed:
    """A delivery whose signature verified; its event not read yet."""

    token: str
    signed_at: datetime
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class TokenOnly:
    """A signed delivery that writes nothing but its token (ignored, or refused as never
    storable): the token is used up all the same, so a replay carrying other event-data is a replay."""

    token: str
    signed_at: datetime


@dataclass(frozen=True, slots=True)
class Ignored:
    """A well-signed event the mirror has no use for."""

    event: str
    reason: str


def event_label(name: object) -> str:
    return name if isinstance(name, str) and name in EVENTS else "other"


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise WebhookPayloadError(
            "the body is not JSON (legacy form-encoded webhooks are not supported)",
            reason="not_json") from None
    if not isinstance(payload, dict):
        raise WebhookPayloadError("the body is not a JSON object", reason="not_json")
    return payload


def _signature_valid(block: object, key: str) -> tuple[str, str] | str:
    """(timestamp, token) of a signature block that verifies under `key`, else why not:
    `missing` (no block, or fields missing or malformed) or `mismatch`."""
    if not isinstance(block, Mapping):
        return "missing"
    timestamp, token, signature = block.get("timestamp"), block.get("token"), block.get("signature")
    if isinstance(timestamp, int) and not isinstance(timestamp, bool):
        timestamp = str(timestamp)
    if not (isinstance(timestamp, str) and isinstance(token, str) and isinstance(signature, str)):
        return "missing"
    if not (0 < len(token) <= 512 and "\x00" not in token and signature.isascii()):
        return "missing"
    expected = sign(key, timestamp, token)
    if not hmac.compare_digest(expected.encode(), signature.lower().encode()):
        return "mismatch"
    return timestamp, token


def verify(payload: Mapping[str, Any], *, key: str, now: float, max_age: float) -> tuple[str, datetime]:
    """The delivery's token and signing time, if its signature (or, for a subaccount, its
    `parent-signature`) verifies under `key` and is at most `max_age` seconds from `now`.
    A refusal's `reason` is `missing`, `mismatch` or `stale`."""
    found = _signature_valid(payload.get("signature"), key)
    if isinstance(found, str):  # a subaccount's delivery may verify by the primary account's key
        parent = _signature_valid(payload.get("parent-signature"), key)
        if not isinstance(parent, str) or found == "missing":
            found = parent
    if isinstance(found, str):
        raise WebhookAuthError("the signature is missing or does not match MAILGUN_WEBHOOK_SIGNING_KEY",
                               reason=found)
    timestamp, token = found
    # Mailgun signs `timestamp + token` with no separator, so one signature stands for every way
    # of cutting that string in two. Whole seconds in plain digits leave one cut inside the window
    # (any other is off by a factor of ten); read as a float, "1780000000" + "e0abc..." would also
    # be "1780000000e0" + "abc...": a token never used, to replay a delivery with forged event-data.
    if not WHOLE_SECONDS.fullmatch(timestamp):
        raise WebhookAuthError(f"the signature's timestamp {timestamp[:40]!r} is not whole seconds",
                               reason="stale")
    seconds = float(timestamp)
    if not abs(now - seconds) <= max_age:  # also refuses nan and inf
        raise WebhookAuthError(
            f"the signature's timestamp is {now - seconds:.0f} s from now, more than WEBHOOK_MAX_AGE "
            f"({max_age:g} s)", reason="stale")
    return token, datetime.fromtimestamp(int(seconds), UTC)


def _dig(data: Mapping[str, Any], *path: str) -> Any:
    value: Any = data
    for step in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(step)
    return value


def _domain_of(address: object) -> str | None:
    if not isinstance(address, str):
        return None
    _, mailbox = parseaddr(address)
    domain = (mailbox or address).rpartition("@")[2].strip(" <>")
    return domain or None


def domain_candidates(data: Mapping[str, Any]) -> list[str]:
    """Where an event names its sending domain, most reliable first: the stored message's URL,
    the Message-Id Mailgun generates, the envelope sender, the From header."""
    found = []
    url = _dig(data, "storage", "url")
    if isinstance(url, str) and (match := _STORAGE_DOMAIN.search(url)):
        found.append(match["domain"])
    senders = (_dig(data, "message", "headers", "message-id"), _dig(data, "envelope", "sender"),
               _dig(data, "message", "headers", "from"))
    found.extend(d for d in map(_domain_of, senders) if d is not None)
    return found


def resolve_domain(data: Mapping[str, Any], path_domain: str | None, domains: Sequence[str]) -> str:
    """The configured domain the event belongs to: the one in the URL path if given, else the
    first the event names."""
    configured = {d.lower(): d for d in domains}
    if path_domain is not None:
        if path_domain.lower() not in configured:
            raise UnknownDomainError(f"{path_domain[:100]!r} is not a domain this daemon syncs")
        return configured[path_domain.lower()]
    candidates = domain_candidates(data)
    for candidate in candidates:
        if candidate.lower() in configured:
            return configured[candidate.lower()]
    named = ", ".join(repr(c[:100]) for c in candidates) or "no domain"
    raise UnknownDomainError(
        f"the event names {named}, none of the domains this daemon syncs; "
        "post it to /webhooks/mailgun/<domain>")


def _kind(data: Mapping[str, Any]) -> SuppressionList | Ignored:
    event = data.get("event")
    if event == "complained":
        return SuppressionList.COMPLAINTS
    if event == "unsubscribed":
        return SuppressionList.UNSUBSCRIBES
    if event == "failed":
        severity, reason = data.get("severity"), data.get("reason")
        if severity != "permanent":
            return Ignored("failed", f"a {severity} failure" if isinstance(severity, str) else
                           "a failure of no severity")
        if isinstance(reason, str) and reason.startswith("suppress-"):
            return Ignored("failed", f"a drop ({reason}): the address is already on a list")
        return SuppressionList.BOUNCES
    return Ignored(event_label(event), "not a suppression event")


def _recipient(data: Mapping[str, Any]) -> str:
    address = data.get("recipient")
    if not isinstance(address, str) or not address.strip():
        raise WebhookPayloadError("the event has no recipient")
    address = address.strip()
    if len(address) > MAX_ADDRESS:
        raise WebhookPayloadError(f"the recipient has {len(address)} characters (at most {MAX_ADDRESS})")
    problem = address_problem(address)
    if problem is not None:
        raise WebhookPayloadError(f"the recipient {address[:100]!r} is not an address: {problem}")
    return address


def _event_time(data: Mapping[str, Any]) -> datetime:
    value = data.get("timestamp")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WebhookPayloadError("the event has no numeric timestamp")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise WebhookPayloadError(f"the event's timestamp {value!r} is out of range") from None


def _bounce_fields(data: Mapping[str, Any]) -> tuple[str, str]:
    status = data.get("delivery-status")
    status = status if isinstance(status, Mapping) else {}
    code = status.get("code")
    code_text = str(code) if isinstance(code, int | str) and not isinstance(code, bool) \
        and str(code).strip() else "550"
    error = next((v for v in (status.get("message"), status.get("description"))
                  if isinstance(v, str) and v.strip()), "")
    return _clean(code_text)[:64] or "550", _clean(error)


def _tags(data: Mapping[str, Any]) -> tuple[str, ...]:
    tags = data.get("tags")
    found = {_clean(t) for t in tags if isinstance(t, str) and _clean(t)} if isinstance(tags, list) else set()
    return tuple(sorted(found)) or ("*",)


def authenticate(body: bytes, *, key: str, now: float, max_age: float) -> Signed:
    """The body read and its signature verified, nothing more: no I/O, so a request nobody signed
    costs no database work. Raises WebhookAuthError, or WebhookPayloadError for a body that is no
    JSON object; each with its `reason`."""
    payload = parse_body(body)
    token, signed_at = verify(payload, key=key, now=now, max_age=max_age)
    return Signed(token, signed_at, payload)


def read_signed(signed: Signed, *, domains: Sequence[str],
                path_domain: str | None = None) -> WebhookEvent | Ignored:
    """The event of a signed delivery. Raises WebhookPayloadError (UnknownDomainError)."""
    token, signed_at, payload = signed.token, signed.signed_at, signed.payload
    data = payload.get("event-data")
    if not isinstance(data, Mapping):
        raise WebhookPayloadError("the payload has no event-data object")
    kind = _kind(data)
    if isinstance(kind, Ignored):
        return kind
    domain = resolve_domain(data, path_domain, domains)
    address = _recipient(data)
    event_id = data.get("id")
    common: dict[str, Any] = {
        "kind": kind, "event": str(data["event"]), "domain": domain, "address": address,
        "occurred_at": _event_time(data), "token": token, "signed_at": signed_at,
        "event_id": _clean(event_id)[:200] if isinstance(event_id, str) else ""}
    if kind is SuppressionList.BOUNCES:
        code, error = _bounce_fields(data)
        return WebhookEvent(**common, code=code, error=error)
    if kind is SuppressionList.UNSUBSCRIBES:
        return WebhookEvent(**common, tags=_tags(data))
    return WebhookEvent(**common)


def read_event(body: bytes, *, key: str, domains: Sequence[str], max_age: float, now: float,
               path_domain: str | None = None) -> WebhookEvent | Ignored:
    """Verify and read one delivery. Raises WebhookAuthError or WebhookPayloadError."""
    return read_signed(authenticate(body, key=key, now=now, max_age=max_age), domains=domains,
                       path_domain=path_domain)
