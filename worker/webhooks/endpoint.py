"""`POST /webhooks/mailgun[/{domain}]`: Mailgun's signed webhooks into the mirror.

Answers, as Mailgun reads them: 200 stored, a replay, superseded by a local removal, or ignored
(Mailgun stops); 401 a missing, wrong or stale signature and 503 webhooks not configured or the
database failing (Mailgun retries for 8 hours); 406 a payload that can never be stored, or an event
whose data the database refuses (Mailgun stops); 400 a body that could not be read (a broken
Content-Encoding or chunk, cut short, the client gone before its end) and 408 one not sent within
BODY_WITHIN.

A request is refused before any database work unless its signature verifies (counted in
`mailgun_sync_webhooks_unverified_total`), so unsigned floods cost no queries. A signed one uses
its token up with whatever it is answered: stored, superseded, ignored or refused (406). Only a
503 leaves the token unused, since Mailgun retries with the same one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from worker.errors import (
    SyncError,
    UnknownDomainError,
    WebhookBodyError,
    WebhookDataRefusedError,
    WebhookError,
    WebhookPayloadError,
)
from worker.logs import get_logger
from worker.metrics import Metrics
from worker.webhooks.events import Ignored, Signed, TokenOnly, authenticate, event_label, read_signed
from worker.webhooks.writer import USED, Delivery, WebhookWriter

log = get_logger(__name__)

PATH = "/webhooks/mailgun"
# Mailgun's event payloads are a few kilobytes; this leaves room for large user variables.
MAX_BODY = 64 * 1024
# How long a client has to send the body once its request head has come (the head's own bound
# is the server's): Mailgun sends a few kilobytes at once; a client trickling its body (slowloris)
# is answered 408 and its connection closed.
BODY_WITHIN = 15.0
# Refusals are logged at most once a second for each answer (401, 406): a flood of forged
# requests would otherwise cost a log line each, more than its refusal. The metric counts all.
REFUSALS_LOGGED_EVERY = 1.0


class WebhookEndpoint:
    def __init__(self, *, signing_key: str | None, domains: Sequence[str] | Callable[[], Sequence[str]],
                 max_age: float, writer: WebhookWriter | None, metrics: Metrics,
                 domains_complete: Callable[[], bool] = lambda: True) -> None:
        """`domains`: the domains whose events are taken, or a function giving them now (the
        daemon's, which discovery and refreshes change); `domains_complete`: whether that list is
        whole (false while a region's listing has failed)."""
        self._domains_complete = domains_complete
        self._key = signing_key
        if callable(domains):
            self._domains = domains
        else:
            fixed = tuple(domains)
            self._domains = lambda: fixed
        self._max_age = max_age
        self._writer = writer
        self._metrics = metrics
        # For each refusal status: when one was last logged, and how many were not since.
        self._refusals: dict[int, tuple[float, int]] = {}

    def register(self, app: web.Application) -> None:
        """The app's client_max_size must be MAX_BODY."""
        app.router.add_post(PATH, self.handle)
        app.router.add_post(PATH + "/{domain}", self.handle)

    def _answer(self, status: int, event: str, outcome: str, text: str) -> web.Response:
        self._metrics.observe_webhook(event, outcome)
        return web.Response(status=status, text=text + "\n")

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        response = await self._handle(request)
        self._metrics.observe_webhook_answer(response.status, time.perf_counter() - started)
        return response

    async def _handle(self, request: web.Request) -> web.Response:
        if self._key is None or self._writer is None:
            return self._answer(503, "other", "unconfigured",
                                "webhooks are not configured: set MAILGUN_WEBHOOK_SIGNING_KEY")
        try:
            async with asyncio.timeout(BODY_WITHIN):
                body = await request.read()  # at most the app's client_max_size
        except web.HTTPRequestEntityTooLarge:
            return self._unverified(WebhookPayloadError(f"the body is larger than {MAX_BODY} bytes",
                                                        reason="too_large"))
        except web.RequestPayloadError as exc:  # what the client sent does not decode or frame
            # The connection is closed after the answer: aiohttp would otherwise go on reading the
            # broken body to keep the connection, and log each failure with its traceback.
            request.content.feed_eof()
            refused = self._unverified(WebhookBodyError(f"the body could not be read: {_why(exc)}"))
            refused.force_close()
            return refused
        except ConnectionError:  # the client hung up mid-body: the answer reaches nobody
            return self._unverified(WebhookBodyError("the connection closed before the body's end"))
        except TimeoutError:
            request.content.feed_eof()  # answered now, and closed: not read on after the answer
            refused = self._unverified(WebhookBodyError(
                f"the body was not sent within {BODY_WITHIN:g} s", reason="too_slow", status=408))
            refused.force_close()
            return refused
        try:
            signed = authenticate(body, key=self._key, now=time.time(), max_age=self._max_age)
        except WebhookError as exc:
            return self._unverified(exc)
        domains = self._domains()
        if not domains:  # the daemon is still planning them: a 406 now would lose the event
            return self._answer(503, "other", "starting", "the daemon is starting: try again")
        try:
            found = read_signed(signed, domains=domains, path_domain=request.match_info.get("domain"))
        except UnknownDomainError as exc:
            if not self._domains_complete():
                # Maybe a domain of a region that could not be listed: a 406 would lose it.
                log.warning("webhook_domain_unknown_yet", reason=str(exc))
                return self._answer(503, "other", "unknown_domain_yet",
                                    "the daemon's list of domains is incomplete: try again")
            return await self._refuse_signed(signed, exc)
        except WebhookPayloadError as exc:
            return await self._refuse_signed(signed, exc)
        if isinstance(found, Ignored):
            if (outcome := await self._commit(_token_only(signed), found.event)) != USED:
                return self._committed(found.event, outcome)
            log.debug("webhook_ignored", webhook_event=found.event, reason=found.reason)
            return self._answer(200, found.event, "ignored", f"ignored: {found.reason}")
        label = event_label(found.event)
        try:
            outcome = await self._commit(found, label, domain=found.domain, list=found.kind.value)
        except WebhookDataRefusedError as exc:
            # Logged each time, not once a second: a genuine event the mirror will never hold.
            log.warning("webhook_refused_by_database", webhook_event=found.event, domain=found.domain,
                        list=found.kind.value, constraint=exc.constraint, sqlstate=exc.sqlstate,
                        reason=str(exc))
            return self._answer(exc.status, label, "refused", str(exc))
        if outcome is not None:
            log.debug("webhook_written", webhook_event=found.event, domain=found.domain,
                      list=found.kind.value, outcome=outcome)
        return self._committed(label, outcome)

    async def _commit(self, delivery: Delivery, label: str, **context: str) -> str | None:
        """The delivery's outcome, committed with its token; None if nothing was (logged). Raises
        WebhookDataRefusedError if the database refused the event's data, its token used up."""
        assert self._writer is not None
        try:
            return await self._writer.submit(delivery)
        except WebhookDataRefusedError:
            raise
        except SyncError as exc:
            log.error("webhook_store_failed", webhook_event=label, error=str(exc), **context)
            return None

    def _committed(self, label: str, outcome: str | None) -> web.Response:
        """The answer to an event's outcome, or to a token-only delivery's replay or failure."""
        if outcome is None:  # nothing committed, the token included: Mailgun's retry is taken
            return self._answer(503, label, "error", "not stored; retry later")
        return self._answer(200, label, outcome, outcome)

    async def _refuse_signed(self, signed: Signed, exc: WebhookError) -> web.Response:
        """A signed delivery that can never be stored: refused once its token is used up, so a
        replay carrying other event-data is a replay."""
        outcome = await self._commit(_token_only(signed), "other")
        if outcome != USED:
            return self._committed("other", outcome)
        return self._refuse(exc)

    def _unverified(self, exc: WebhookError) -> web.Response:
        """Refused before any database work: nothing vouches for the request."""
        self._metrics.observe_unverified(exc.reason)
        return self._refuse(exc)

    def _refuse(self, exc: WebhookError) -> web.Response:
        outcome = "unauthorized" if exc.status == 401 else "refused"
        now = time.monotonic()
        logged, held = self._refusals.get(exc.status, (-REFUSALS_LOGGED_EVERY, 0))
        if now - logged >= REFUSALS_LOGGED_EVERY:
            log.warning("webhook_refused", status=exc.status, reason=str(exc), not_logged_before=held)
            self._refusals[exc.status] = (now, 0)
        else:
            self._refusals[exc.status] = (logged, held + 1)
        return self._answer(exc.status, "other", outcome, str(exc))


def _why(exc: web.RequestPayloadError) -> str:
    """aiohttp's reason on one line: its parser's message (`Can not decode content-encoding:
    gzip`), without the status and line breaks it wraps it in."""
    cause = exc.__cause__
    text = cause.message if isinstance(cause, HttpProcessingError) and cause.message else str(exc)
    return " ".join(text.split()).removeprefix("400, message: ")


def _token_only(signed: Signed) -> TokenOnly:
    return TokenOnly(signed.token, signed.signed_at)
