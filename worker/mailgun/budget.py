"""Mailgun's request budget (`X-Request-Limit/Remaining/Reset`), shared by all of a client's
requests, so that parallel readers slow down before the budget runs out instead of meeting a
storm of 429s.

A reset time comes from the server's clock and header, either of which can be wrong: a reset in
the past says nothing about when to try again, and one further away than `max_wait` is taken as
`max_wait` (logged once, until a plausible reset comes again), so one request never waits longer
than one capped wait for its budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from worker.logs import get_logger

log = get_logger(__name__)

# Mailgun sends the reset in epoch milliseconds. A smaller number is read as epoch seconds, and
# one too small for a date of this century as seconds from now.
_EPOCH_MS = 10**11
_EPOCH_S = 10**9


def _whole_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes `²` (which int() refuses) and other scripts'."""
    return text.isascii() and text.isdigit()


def seconds_until_reset(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from `now` until an `X-Request-Reset` value; None when absent, unreadable or past."""
    if value is None or not _whole_number(value.strip()):
        return None
    number = int(value.strip())
    now = time.time() if now is None else now
    if number >= _EPOCH_MS:
        wait = number / 1000 - now
    elif number >= _EPOCH_S:
        wait = number - now
    else:
        wait = float(number)
    return wait if wait > 0 else None


class RequestBudget:
    def __init__(self, *, reserve: int = 2, max_wait: float = 60.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if max_wait <= 0:
            raise ValueError("max_wait must be positive")
        self._reserve = reserve
        self._max_wait = max_wait
        self._sleep = sleep
        self._remaining: int | None = None
        self._reset: str | None = None
        self._resume_at: float | None = None  # monotonic time the spent window turns
        self._implausible = False  # logged once, until a plausible reset comes again

    def note(self, headers: Mapping[str, str]) -> None:
        """Take the budget from an answer's headers (the server's count is the truth)."""
        remaining, reset = headers.get("X-Request-Remaining"), headers.get("X-Request-Reset")
        if remaining is None or reset is None or not _whole_number(remaining.strip().removeprefix("-")) \
                or not _whole_number(reset.strip()):
            return
        self._remaining = int(remaining)
        self._reset = reset.strip()
        self._resume_at = None
        self._check_spent()

    async def spend(self) -> None:
        """Count one request; while the budget is spent, first wait for its window to turn.
        That turn is at most `max_wait` after the answer that spent it, and one wait reaches it."""
        self._check_spent()
        if self._remaining is not None:
            self._remaining -= 1
        if self._resume_at is None:
            return
        wait = self._resume_at - time.monotonic()
        if wait <= 0:
            self._resume_at = None
            return
        log.info("request_budget_wait", wait_s=round(wait, 3))
        await self._sleep(wait)

    def _check_spent(self) -> None:
        """Once the budget is down to the reserve, the next requests wait for the window to turn;
        past that turn the budget is unknown until an answer in the new window tells it."""
        if self._remaining is None or self._remaining > self._reserve:
            return
        self._remaining = None
        wait = seconds_until_reset(self._reset)
        if wait is None:
            return
        self._implausible, was_implausible = wait > self._max_wait, self._implausible
        if self._implausible:
            if not was_implausible:
                log.warning("request_reset_implausible", reset=self._reset, wait_s=round(wait, 3),
                            capped_s=self._max_wait)
            wait = self._max_wait
        self._resume_at = time.monotonic() + wait
