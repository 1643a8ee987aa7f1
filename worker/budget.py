"""Mailgun's request budget (`X-Request-Limit/Remaining/Reset`), shared by all of a client's
requests, so that parallel readers slow down before the budget runs out instead of meeting a
storm of 429s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from worker.logs import get_logger

log = get_logger(__name__)


class RequestBudget:
    def __init__(self, *, reserve: int = 2, max_wait: float = 60.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._reserve = reserve
        self._max_wait = max_wait
        self._sleep = sleep
        self._remaining: int | None = None
        self._reset_at = 0.0

    def note(self, headers: Mapping[str, str]) -> None:
        """Take the budget from an answer's headers (the server's count is the truth)."""
        remaining, reset = headers.get("X-Request-Remaining"), headers.get("X-Request-Reset")
        if remaining is None or reset is None or not remaining.lstrip("-").isdigit() or not reset.isdigit():
            return
        self._remaining = int(remaining)
        self._reset_at = int(reset) / 1000

    async def spend(self) -> None:
        """Wait, if the budget is nearly spent, until its window turns; then count one request."""
        while self._remaining is not None and self._remaining <= self._reserve:
            wait = self._reset_at - time.time()
            if wait <= 0:
                self._remaining = None  # a new window: the next answer tells its budget
                break
            log.info("request_budget_wait", remaining=self._remaining, wait_s=round(wait, 3))
            await self._sleep(min(wait, self._max_wait))
        if self._remaining is not None:
            self._remaining -= 1
