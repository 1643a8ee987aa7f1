"""When each list is due, shared in PostgreSQL by every daemon replica (table `mailgun.schedule`).

A replica claims the lists that are due, as many as it has room to run; a claim moves the list's
due time a short lease ahead, and the replica renews it while the run lasts, so no other replica
takes the list meanwhile. When the run ends, the replica sets the next due time from the list's
schedule. So each list is reconciled once per interval however many replicas there are, an idle
replica takes what is due at once (a replica that joins takes its share on its first claim), and
the lists of a replica that died are taken by the others when its leases run out. The list's
advisory lock (worker/store.py) stays the guard against two runs at once: a claim only decides
who tries.

Times come from the database's clock, so replicas whose clocks disagree still agree on what is due.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from worker.database import connection_within, wrap_db_errors
from worker.sql import queries

# How often a replica claims the lists due and renews the claims of its runs in progress.
CLAIM_EVERY = 0.5
# A claim not renewed runs out after at most this long: a replica that died (or lost its
# database) hands its lists over within that, plus a claim's period.
LONGEST_LEASE = 60.0
# A claim, or the end of a run, is over within this long whatever the server does: the next claim
# comes a second later, and an end not recorded only lets the claim run out.
SHORT_WORK_WITHIN = 10.0


@dataclass(frozen=True, slots=True)
class PlannedList:
    """A list this replica syncs: its schedule (see `schedule_of`) and its lease, and in how many
    seconds it is first due if new."""

    domain: str
    list: str
    schedule: str
    lease_s: float
    first_in: float


@dataclass(frozen=True, slots=True)
class Claim:
    """A list this replica may run now."""

    domain: str
    list: str
    anchor_at: datetime
    lease_s: float
    claimed_at: datetime  # the database's clock


def schedule_of(trigger: BaseTrigger) -> str:
    """The schedule itself, without its jitter: APScheduler's triggers print their interval or
    their crontab fields, and nothing random."""
    return str(trigger)


def lease_for(trigger: BaseTrigger) -> float:
    """How long a claim stands unrenewed: short enough that a list whose replica died in its
    run is taken again before two intervals have passed since its last run began (an interval,
    the claims' period twice, and the lease), long enough to outlast a few missed renewals, and
    at most LONGEST_LEASE."""
    if isinstance(trigger, IntervalTrigger):
        return min(max(float(trigger.interval_length) - 2 * CLAIM_EVERY, 3 * CLAIM_EVERY), LONGEST_LEASE)
    return LONGEST_LEASE


def first_in(jitter: float) -> float:
    """A list new to the schedule is due within the jitter (at most 5 s) of the database's now:
    replicas started together do not reach for the same lists at once, and the first runs start
    at once."""
    return random.uniform(0, min(jitter, 5.0))  # nosec B311


def next_due(trigger: BaseTrigger, claim: Claim, ended_at: datetime) -> datetime:
    """When the list is due again after a run that ended at `ended_at` (the database's clock). An
    interval schedule keeps to the grid anchored where the list was first due: the next point
    after the run's end, so a run longer than the interval is followed at once by the next one,
    never by a pile of missed ones (cron's behaviour, APScheduler's `coalesce`), and at least half
    an interval after the claim, so a run started ahead of its point (a list given back by a
    stopping replica, taken again at once) is not followed by another at that point."""
    if isinstance(trigger, IntervalTrigger):
        grid = IntervalTrigger(seconds=trigger.interval_length, start_date=claim.anchor_at,
                               jitter=trigger.jitter, timezone=trigger.timezone)
        half = timedelta(seconds=trigger.interval_length / 2)
        due = grid.get_next_fire_time(None, max(ended_at, claim.claimed_at + half))
    else:
        due = trigger.get_next_fire_time(None, ended_at)
    # A schedule that never fires again (a cron date that never comes is refused when read) is
    # tried again after a lease rather than never.
    return due if due is not None else ended_at + timedelta(seconds=claim.lease_s)


class SharedSchedule:
    """The schedule table, for one replica."""

    def __init__(self, pool: asyncpg.Pool, replica: str, *, claims_pool: asyncpg.Pool | None = None) -> None:
        """`claims_pool` for the claims, their renewals and the ends of runs, which must not wait
        for a connection behind runs that hold them all (a lease would run out meanwhile), nor
        take the webhooks' and probes': the daemon's schedule pool. `pool` for planning, which
        may take longer than that pool lets a statement run (20,000 lists at once)."""
        self._pool = pool
        self._claims = claims_pool or pool
        self.replica = replica

    async def plan(self, lists: Sequence[PlannedList]) -> None:
        """Put this replica's lists on the schedule (new ones due at their first due time) and
        mark them planned now."""
        if not lists:
            return
        async with wrap_db_errors("planning the schedule"):
            await self._pool.execute(
                queries()["plan_lists"], [p.domain for p in lists], [p.list for p in lists],
                [p.schedule for p in lists], [p.lease_s for p in lists], [p.first_in for p in lists])

    async def claim(self, limit: int, domains: Sequence[str]) -> list[Claim]:
        """Up to `limit` due lists of `domains` (those this replica syncs), now its to run."""
        async with connection_within(self._claims, SHORT_WORK_WITHIN, "claiming the lists due") as db:
            rows = await db.fetch(
                queries()["claim_due_lists"], self.replica, limit, list(domains))
        return [Claim(r["domain"], r["list"], r["anchor_at"], r["lease_s"], r["claimed_at"]) for r in rows]

    async def renew(self, claims: Iterable[Claim]) -> None:
        """The claims of this replica's runs in progress stand a lease longer."""
        held = list(claims)
        if not held:
            return
        async with connection_within(self._claims, SHORT_WORK_WITHIN, "renewing claims") as db:
            await db.execute(queries()["renew_claims"], self.replica, [c.domain for c in held],
                             [c.list for c in held])

    async def ran(self, claim: Claim, due: datetime, schedule: str) -> None:
        """The claimed list's run ended: it is next due at `due`, computed on `schedule` (unless
        the list has been planned on another since)."""
        async with connection_within(self._claims, SHORT_WORK_WITHIN,
                                     f"scheduling {claim.domain} {claim.list}") as db:
            await db.execute(queries()["schedule_next"], claim.domain, claim.list, due, schedule)

    async def release(self, claims: Iterable[Claim], *, within: float, after: float = 0.0) -> None:
        """Give claims back unrun: another replica may take them `after` seconds from now. Over
        within `within` seconds whatever the server does (DatabaseTimeoutError)."""
        given = list(claims)
        if not given:
            return
        async with connection_within(self._claims, within, "giving claims back") as db:
            await db.execute(queries()["release_lists"], [c.domain for c in given],
                             [c.list for c in given], after)
