"""Mailgun's response texts, word for word as recorded or documented (reference sections 2 and 5)."""

from __future__ import annotations

import hashlib

from worker.records import SuppressionList

NOT_FOUND = {
    SuppressionList.BOUNCES: "Address not found in bounces table",
    SuppressionList.UNSUBSCRIBES: "Address not found in unsubscribers table",
    SuppressionList.COMPLAINTS: "No spam complaints found for this address",
    SuppressionList.ALLOWLIST: "Address/Domain not found in whitelists table",
}

ADDED_ONE = {
    SuppressionList.BOUNCES: "Address has been added to the bounces table",
    SuppressionList.UNSUBSCRIBES: "Address has been added to the unsubscribes table",
    SuppressionList.COMPLAINTS: "Address has been added to the complaints table",
    SuppressionList.ALLOWLIST: "Address/Domain has been added to the whitelists table",
}

ADDED_MANY = {
    SuppressionList.BOUNCES: "{n} addresses have been added to the bounces table",
    SuppressionList.UNSUBSCRIBES: "{n} addresses have been added to the unsubscribes table",
    SuppressionList.COMPLAINTS: "{n} complaint addresses have been added to the complaints table",
}

REMOVED_ONE = {
    SuppressionList.BOUNCES: "Bounced address has been removed",
    SuppressionList.UNSUBSCRIBES: "Unsubscribe event has been removed",
    SuppressionList.COMPLAINTS: "Spam complaint has been removed",
    SuppressionList.ALLOWLIST: "Whitelist address/domain has been removed",
}

REMOVED_ALL = {
    SuppressionList.BOUNCES: "Bounced addresses for this domain have been removed",
    SuppressionList.UNSUBSCRIBES: "Unsubscribe addresses for this domain have been removed",
    SuppressionList.COMPLAINTS: "Complaint addresses for this domain have been removed",
    SuppressionList.ALLOWLIST: "Whitelist addresses/domains for this domain have been removed",
}

IMPORTED = "file uploaded successfully"
FORBIDDEN = "Forbidden"
RATE_LIMITED = "Rate Limited: request limit reached. Try again later (and slower)."
INTERNAL = "Internal Server Error"


def domain_not_found(domain: str) -> str:
    return f"Domain not found: {domain}"


def domain_item(name: str, *, disabled: bool = False) -> dict[str, object]:
    """One item of `GET /v3/domains`, with the fields Mailgun documents for it."""
    ident = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:24]  # a label, not a secret
    return {
        "created_at": "Tue, 03 Mar 2026 10:00:00 GMT", "id": ident,
        "is_disabled": disabled, "name": name, "require_tls": False, "skip_verification": False,
        "smtp_login": f"postmaster@{name}", "spam_action": "disabled",
        "state": "disabled" if disabled else "active", "type": "custom", "web_prefix": "email",
        "web_scheme": "https", "wildcard": False,
    }


def missing(parameter: str) -> str:
    return f"Missing mandatory parameter: {parameter}"


def invalid_format(parameter: str, value: object) -> str:
    return f"Invalid format for parameter {parameter}: {value}"


def invalid_parameter(parameter: str, value: object) -> str:
    return f"Invalid parameter: {parameter} {value}"
