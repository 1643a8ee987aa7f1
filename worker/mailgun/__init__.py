"""Talking to Mailgun: the client and the parts it is built from.

`client` is the API the worker uses (pages, pushes, deletes, the account's domains); `retry` and
`budget` decide when a request may be sent again.
"""

from worker.mailgun.client import DEFAULT_PAGE_LIMIT, MailgunClient, PushOutcome, RangeTrace, Rejection
from worker.mailgun.domain_listing import AccountDomain
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
