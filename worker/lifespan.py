"""Open the process's long-lived resources in one place and close them in reverse order."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import asyncpg

from worker.database import open_pool
from worker.errors import ConfigError
from worker.mailgun import HttpObserver, MailgunClient
from worker.mailgun.retry import RetryPolicy
from worker.schedule import SHORT_WORK_WITHIN
from worker.settings import Settings
from worker.store import MirrorStore
from worker.webhooks.writer import WRITE_WITHIN

# The daemon's connections for its shared schedule: a claim and a renewal twice a second, one
# after the other, and each run's end.
SCHEDULE_POOL_SIZE = 2


@dataclass(frozen=True)
class Resources:
    pool: asyncpg.Pool
    store: MirrorStore
    mailgun: MailgunClient  # the client of MAILGUN_API_BASE, the default region
    # One client per other region (API origin) a domain lives in, made on first use; they share
    # the process's HTTP session.
    regional: Callable[[str], MailgunClient] | None = None
    # The daemon's webhooks and /readyz take their connections from a pool of their own: a run
    # holds its connection for its whole pull (the list's lock), and runs of slow lists could
    # otherwise take every connection for minutes. None: they share `pool` (no daemon).
    serving_pool: asyncpg.Pool | None = None
    # The shared schedule's claims, their renewals and the ends of runs take theirs from a third:
    # when the schedule's rows are slow to update, the runs ending at once would otherwise hold
    # every connection of the webhooks' and probes'. None: they share `serving`.
    schedule_pool: asyncpg.Pool | None = None

    @property
    def serving(self) -> asyncpg.Pool:
        return self.pool if self.serving_pool is None else self.serving_pool

    @property
    def claims(self) -> asyncpg.Pool:
        return self.serving if self.schedule_pool is None else self.schedule_pool

    def mailgun_for(self, api_base: str) -> MailgunClient:
        return self.mailgun if self.regional is None else self.regional(api_base)


@contextlib.asynccontextmanager
async def open_resources(settings: Settings, *, observer: HttpObserver | None = None,
                         serving: bool = False) -> AsyncIterator[Resources]:
    """The database pool, the one HTTP session of the process, and the clients built on them;
    `serving`: also the daemon's pool for webhooks and probes (WEBHOOK_POOL_SIZE connections) and
    its shared schedule's (SCHEDULE_POOL_SIZE)."""
    if not settings.database_url:
        raise ConfigError("DATABASE_URL", "is not set; give a postgresql:// URL for the mirror")
    async with contextlib.AsyncExitStack() as stack:
        pool = await stack.enter_async_context(open_pool(settings.database_url,
                                                         answer_within=settings.database_timeout))
        serving_pool = await stack.enter_async_context(
            open_pool(settings.database_url, max_size=settings.webhook_pool_size,
                      statement_timeout=WRITE_WITHIN)) if serving else None
        schedule_pool = await stack.enter_async_context(
            open_pool(settings.database_url, max_size=SCHEDULE_POOL_SIZE,
                      statement_timeout=SHORT_WORK_WITHIN)) if serving else None
        session = await stack.enter_async_context(aiohttp.ClientSession())

        @functools.cache
        def client_for(api_base: str) -> MailgunClient:
            return MailgunClient(
                session, api_base=api_base, api_key=settings.api_key,
                retry=RetryPolicy(max_attempts=settings.max_attempts, backoff_max=settings.backoff_max),
                timeout=settings.http_timeout, observer=observer)

        store = MirrorStore(pool, answer_within=settings.database_timeout)
        yield Resources(pool=pool, store=store, mailgun=client_for(settings.api_base),
                        regional=client_for, serving_pool=serving_pool, schedule_pool=schedule_pool)
