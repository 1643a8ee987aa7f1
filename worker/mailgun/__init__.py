"""Talking to Mailgun. `client` is the API the worker uses; it is built on `transport` (one request:
the key, the budget of `budget`, the retries of `retry`, typed errors), `paging` (one pull of a
list, with its guards) and `domain_listing` (the account's domains)."""

from worker.mailgun.client import DEFAULT_PAGE_LIMIT, MailgunClient, PushOutcome, Rejection
from worker.mailgun.domain_listing import AccountDomain
from worker.mailgun.paging import RangeTrace
from worker.mailgun.transport import HttpObserver

__all__ = [
    "DEFAULT_PAGE_LIMIT",
    "AccountDomain",
    "HttpObserver",
    "MailgunClient",
    "PushOutcome",
    "RangeTrace",
    "Rejection",
]
