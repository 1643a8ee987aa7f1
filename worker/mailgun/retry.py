"""When and how long to wait before trying Mailgun again.

Retried: 429, 5xx, connection errors, timeouts and unreadable bodies (raised as `Retryable`).
The wait honours what the server says first (`Retry-After` in seconds or as an HTTP date, else the
`X-Request-Reset` budget reset on a 429), else exponential backoff with full jitter. A time in the
past is no hint (backoff, not every retry at once); `backoff_max` caps every single wait, the
server's included, so a wrong clock or header cannot stall a run for hours.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from worker.logs import get_logger
from worker.mailgun.budget import seconds_until_reset

log = get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class Retryable(Exception):
    """One failed attempt that may succeed if tried again."""

    def __init__(self, reason: str, *, status: int | None = None,
                 wait_hint: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.wait_hint = wait_hint


def server_wait_hint(status: int, headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, if it said so."""
    now = time.time() if now is None else now
    retry_after = headers.get("Retry-After")
    if retry_after:
        value = retry_after.strip()
        if value.isascii() and value.isdigit():  # `²` and `٣` are digits to isdigit(), not to float()
            return float(value)
        try:
            wait = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            pass
        else:
            if wait > 0:
                return wait
    if status == 429:
        return seconds_until_reset(headers.get("X-Request-Reset"), now=now)
    return None


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = 6
    backoff_max: float = 60.0
    backoff_base: float = 0.5
    sleep: Sleep = field(default=asyncio.sleep, compare=False)

    def wait_for(self, state: RetryCallState) -> float:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        hint = error.wait_hint if isinstance(error, Retryable) else None
        if hint is not None:
            return min(max(hint, 0.0), self.backoff_max)
        backoff = wait_random_exponential(multiplier=self.backoff_base, max=self.backoff_max)
        return float(backoff(state))

    def retrying(self, on_retry: Callable[[int | None], None] | None = None,
                 **context: object) -> AsyncRetrying:
        """A tenacity controller for one logical request; `context` goes into the retry log lines,
        and `on_retry` hears the status (None: no answer) of each attempt about to be retried."""

        def before_sleep(state: RetryCallState) -> None:
            outcome = state.outcome
            error = outcome.exception() if outcome is not None else None
            if on_retry is not None:
                on_retry(getattr(error, "status", None))
            log.warning(
                "retry_scheduled", attempt=state.attempt_number,
                wait_s=round(state.upcoming_sleep, 3), reason=str(error),
                status=getattr(error, "status", None), **context)

        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self.wait_for,
            retry=retry_if_exception_type(Retryable),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
