"""Every error mailgun-sync raises on purpose.

    SyncError                      base: catch this to catch everything below
    ├── ConfigError                a setting is missing or malformed (exit code 2)
    ├── StartupError               the system refused what the process needs to start: a port, a
    │                              host name, a directory (exit code 1)
    ├── MailgunError               Mailgun answered, or could not be reached
    │   ├── MailgunAuthError       401: wrong key, or the domain lives in the other region
    │   ├── MailgunNotFoundError   404: unknown domain, or an address not on the list
    │   ├── MailgunRejectedError   another 4xx: Mailgun refused the request as sent
    │   ├── MailgunUnavailableError  429, 5xx, timeouts, resets: still failing after every retry
    │   └── PagingError            a list could not be read completely and safely
    │       ├── MalformedPageError   a page that is not the JSON Mailgun documents
    │       └── PagingOrderError     records not in the order parallel ranges rely on
    ├── DatabaseError              PostgreSQL refused or could not be reached
    │   ├── DatabaseTimeoutError   PostgreSQL did not answer in time (the connection was closed)
    │   └── DataRefusedError       PostgreSQL refused the data itself (a constraint, a bad value):
    │                              the same write would be refused again
    └── WebhookError               a webhook delivery refused; `status` is the answer Mailgun gets
        ├── WebhookAuthError       401: unsigned, badly signed or stale (Mailgun retries)
        ├── WebhookPayloadError    406: a payload that will never be valid (Mailgun stops)
        │   └── WebhookDataRefusedError  406: an event whose data the database refuses
        └── WebhookBodyError       400: a body that could not be read (a broken encoding or
                                   framing, cut short, the client gone); 408: not sent in time

Messages name what is wrong and what to check. The API key never appears in any of them.
"""

from __future__ import annotations

import errno
import socket


class SyncError(Exception):
    """mailgun-sync failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__)


class ConfigError(SyncError):
    """A setting is missing or malformed."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")


class StartupError(SyncError):
    """The system refused what the process needs to start (a port in use, a host name that does
    not resolve, a directory it cannot create); the message names the setting or flag."""

    @classmethod
    def listening(cls, exc: OSError, setting: str, host: str, port: int) -> StartupError:
        """A port or host the process could not listen on, in one line naming the setting."""
        where = f"port {port}" if host in ("0.0.0.0", "") else f"{host}:{port}"  # nosec B104
        if isinstance(exc, socket.gaierror):
            why = f"the host name {host} does not resolve ({exc.strerror})"
        elif exc.errno == errno.EADDRINUSE:
            why = "it is already in use by another process; stop that one or give another port"
        elif exc.errno == errno.EACCES:
            why = "permission denied (a port below 1024 needs privileges); give a port above 1023"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = f"{host} is not an address of this machine"
        else:
            why = exc.strerror or type(exc).__name__
        return cls(f"{setting}: cannot listen on {where}: {why}")


class MailgunError(SyncError):
    """Mailgun answered with an error, or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        mailgun_message: str | None = None,
        url: str | None = None,
    ) -> None:
        self.status = status
        self.mailgun_message = mailgun_message
        self.url = url
        super().__init__(message)


class MailgunAuthError(MailgunError):
    """Mailgun refused the API key (401)."""


class MailgunNotFoundError(MailgunError):
    """Mailgun answered 404."""


class MailgunRejectedError(MailgunError):
    """Mailgun refused the request as sent (a 4xx other than 401, 404 and 429)."""


class MailgunUnavailableError(MailgunError):
    """Mailgun kept failing (429, 5xx, timeouts or resets) until the retries ran out."""


class PagingError(MailgunError):
    """A list could not be read completely; nothing may be concluded from the part read."""


class MalformedPageError(PagingError):
    """A page was not the JSON Mailgun documents."""


class PagingOrderError(PagingError):
    """Mailgun's records did not come in the order parallel ranges rely on; read the list with one
    pager instead."""


class ListShiftedError(PagingError):
    """Records moved between the offsets of a legacy (`skip`) pull, so one may have gone unread;
    read the list again."""


class DatabaseError(SyncError):
    """PostgreSQL refused the operation or could not be reached."""


class DatabaseTimeoutError(DatabaseError):
    """PostgreSQL did not answer in time, and the connection was closed: a transaction whose
    COMMIT was under way may have been committed or not."""


class DataRefusedError(DatabaseError):
    """PostgreSQL refused the data itself: an integrity constraint (SQLSTATE class 23, such as an
    application's CHECK on the mirror) or a value it cannot hold (class 22). Unlike a lost
    connection, a timeout or a serialization failure, the same write is refused however often it
    is tried again."""

    def __init__(self, message: str, *, sqlstate: str, constraint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        # The constraint that refused it, when there is one: what a log line names.
        self.constraint = constraint


class WebhookError(SyncError):
    """A webhook delivery was refused."""

    status = 400

    def __init__(self, message: str | None = None, *, reason: str = "refused") -> None:
        super().__init__(message)
        # A short, bounded label for metrics: why a request was refused.
        self.reason = reason


class WebhookAuthError(WebhookError):
    """The webhook's signature is missing, wrong or stale: answered 401, so Mailgun keeps retrying
    while a misconfigured signing key is fixed."""

    status = 401


class WebhookPayloadError(WebhookError):
    """The webhook's payload can never be stored: answered 406, so Mailgun stops retrying."""

    status = 406


class WebhookBodyError(WebhookError):
    """The request's body could not be read as sent: a Content-Encoding that does not decode, a
    broken chunk, a body shorter than its Content-Length, a client gone before its end. Answered
    400, or 408 to a body not sent within its bound (Mailgun, which sends whole bodies at once,
    gets neither), before any signature is read."""

    status = 400

    def __init__(self, message: str, *, reason: str = "unreadable", status: int = 400) -> None:
        super().__init__(message, reason=reason)
        self.status = status


class UnknownDomainError(WebhookPayloadError):
    """The event's domain is not one the daemon syncs: 406, unless the daemon's list of domains is
    incomplete (a region could not be listed), when the event may be for a domain it would sync."""


class WebhookDataRefusedError(WebhookPayloadError):
    """The database refuses the event's own data (DataRefusedError): no retry can store it, so it
    is answered 406 once its token is used up, and a replay carrying other event-data is a replay."""

    def __init__(self, message: str, *, sqlstate: str, constraint: str | None = None) -> None:
        super().__init__(message, reason="database_refused")
        self.sqlstate = sqlstate
        self.constraint = constraint
