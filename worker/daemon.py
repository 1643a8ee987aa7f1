"""The daemon's schedule: every (domain, list) it syncs, run when due, its readiness, its gauges,
and a drain on SIGTERM (its HTTP ports and signals are worker/serving.py's).

Which list runs when is shared with the other replicas through PostgreSQL (worker/schedule.py):
twice a second the daemon claims the lists that are due, as many as it has room to run.

APScheduler 3's `shutdown(wait=True)` cancels running asyncio jobs instead of waiting for them,
so the daemon tracks its own runs: on a stop signal it pauses the scheduler, waits for the runs
in progress up to `SHUTDOWN_GRACE`, cancels what is left (a cancelled run leaves nothing
half-applied) and only then shuts the scheduler down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from worker.cron import parse_cron
from worker.database import POOL_SIZE, ping
from worker.domains import DomainPlan, Planned
from worker.errors import ConfigError, DatabaseError, SyncError
from worker.lifespan import Resources
from worker.logs import get_logger
from worker.metrics import Metrics
from worker.reconcile import ReconcileOptions, Reconciler
from worker.records import ListRef, SuppressionList
from worker.report import warn_of_unsynced_rows
from worker.retention import prune
from worker.runs import RunStatus
from worker.schedule import (
    CLAIM_EVERY,
    Claim,
    PlannedList,
    SharedSchedule,
    first_in,
    lease_for,
    next_due,
    schedule_of,
)
from worker.settings import Settings

log = get_logger(__name__)

# How long a cancelled run may take to record itself as failed before the stop goes on without
# it: far more than that write needs, unless its connection was lost without being closed.
CANCELLED_RUNS_WITHIN = 5.0
# How long a stop waits to give back the claims of the runs it cancelled.
GIVE_BACK_WITHIN = 1.0


def build_trigger(settings: Settings, plan: DomainPlan | None = None) -> BaseTrigger:
    """The domain's own schedule if it has one, else `SYNC_CRON` (crontab, read as cron reads it)
    if set, else every `SYNC_INTERVAL` seconds."""
    interval, cron, setting = settings.sync_interval, settings.sync_cron, "SYNC_CRON"
    if plan is not None and (plan.interval is not None or plan.cron is not None):
        interval, cron, setting = plan.interval or interval, plan.cron, "SYNC_CONFIG"
    jitter = settings.sync_jitter or None
    if cron is None:
        return IntervalTrigger(seconds=interval, jitter=jitter, timezone=UTC)
    try:
        return parse_cron(cron).trigger(jitter=jitter)
    except ValueError as exc:
        where = f"{settings.config_file} {plan.name}: cron: " if plan is not None and plan.cron else ""
        raise ConfigError(setting, f"{where}{exc}") from None


# The domains to sync, asked again every DISCOVERY_REFRESH seconds: domains discovered in the
# account or added to SYNC_CONFIG since are picked up without a restart.
Planner = Callable[[], Awaitable[Planned]]
DISCOVERY_REFRESH = 3600.0
_REFRESH_JOB = "refresh-domains"
# Rows past SYNC_RETENTION_DAYS are pruned this often; a replica that finds another one pruning
# skips its turn.
PRUNE_INTERVAL = 3600.0
_PRUNE_JOB = "prune-retention"
# Every list's gauges are read from the database this often (see Daemon.refresh_gauges).
GAUGES_EVERY = 30.0
_GAUGES_JOB = "refresh-gauges"
# How many runs the daemon has at once: one per connection of the runs' pool, so a claimed list
# starts at once.
_CLAIM_JOB = "claim-due-lists"
RUN_SLOTS = POOL_SIZE
# How long /readyz waits for PostgreSQL: it answers within a second whatever the database does,
# as a probe's timeout is a second by default in Kubernetes.
READY_WITHIN = 0.8


def fixed_plans(plans: Sequence[DomainPlan]) -> Planner:
    async def planner() -> Planned:
        return Planned(list(plans), [])
    return planner


@dataclass(frozen=True, slots=True)
class _Scheduled:
    """A list this replica syncs, on its domain's schedule."""

    plan: DomainPlan
    kind: SuppressionList
    trigger: BaseTrigger

    @property
    def ref(self) -> ListRef:
        return ListRef(self.plan.name, self.kind)

    @property
    def job(self) -> str:
        """Its id, as the run log and `list_unscheduled` name it: `mg.example.com/bounces`."""
        return f"{self.plan.name}/{self.kind.value}"


def _replica_name() -> str:
    """Who claimed a list, for whoever reads the schedule: the pod's name (the host's, in a
    container), the process, and a random part in case a process id is reused."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Daemon:
    def __init__(self, settings: Settings, resources: Resources, metrics: Metrics,
                 planner: Planner) -> None:
        self._settings = settings
        self._resources = resources
        self._metrics = metrics
        self._planner = planner
        self._options = ReconcileOptions(max_delete_fraction=settings.max_delete_fraction,
                                         pull_ranges=settings.pull_ranges)
        self._reconcilers: dict[str, Reconciler] = {}
        self._scheduler = AsyncIOScheduler(timezone=UTC, job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": None})
        self._shared = SharedSchedule(resources.pool, _replica_name(), claims_pool=resources.claims)
        # The lists this replica syncs, by job id ("domain/list"), and the runs it has now.
        self._lists: dict[str, _Scheduled] = {}
        self._runs: dict[str, tuple[Claim, asyncio.Task[Any]]] = {}
        # Since when the schedule could not be read, and when that was last logged.
        self._unread_since: float | None = None
        self._unread_said = 0.0
        self._running: set[asyncio.Task[Any]] = set()
        self._failures: dict[ListRef, int] = {}
        self._started = False
        self._stopping = False
        # The domains scheduled now; read by the webhook endpoint on every request.
        self._domains: tuple[str, ...] = ()
        self._stale: tuple[str, ...] = ()
        # The domains whose lists it claims.
        self._claimable: tuple[str, ...] = ()

    async def start(self, ports: dict[str, int] | None = None, *, open_files: int | None = None) -> None:
        """Put every (domain, list) on the shared schedule and start claiming. Lists new to the
        schedule are first due within the jitter (at most 5 s), so that replicas started together
        do not all reach for the same list at once; the others are due when their schedule says,
        whichever replica ran them last. `ports`, the ports served by name, and `open_files`, the
        process's limit of open files, are logged with the start."""
        await self._schedule(await self._planner())
        await self.refresh_gauges()
        await self._warn_of_unsynced_rows()
        self._scheduler.add_job(
            self._claim_due, IntervalTrigger(seconds=CLAIM_EVERY, timezone=UTC), id=_CLAIM_JOB,
            name="claim the lists due", next_run_time=datetime.now(UTC))
        self._scheduler.add_job(
            self.refresh_domains, IntervalTrigger(seconds=DISCOVERY_REFRESH, timezone=UTC),
            id=_REFRESH_JOB, name="refresh the domains to sync")
        self._scheduler.add_job(
            self._refresh_gauges_job, IntervalTrigger(seconds=GAUGES_EVERY, timezone=UTC),
            id=_GAUGES_JOB, name="read every list's gauges")
        if self._settings.retention_days > 0:
            # Spread over the first minutes, so replicas started together do not race for the lock.
            first = datetime.now(UTC) + timedelta(
                seconds=random.uniform(0, min(self._settings.sync_jitter, 300.0)))  # nosec B311
            self._scheduler.add_job(
                self.prune, IntervalTrigger(seconds=PRUNE_INTERVAL, timezone=UTC), id=_PRUNE_JOB,
                name="prune past the retention", next_run_time=first)
        self._scheduler.start()
        self._started = True
        if self._settings.failures_before_unready is not None:
            log.warning("setting_has_no_effect", setting="SYNC_FAILURES_BEFORE_UNREADY",
                        detail="readiness no longer depends on failing lists; alert on "
                               "mailgun_sync_consecutive_failures instead")
        limit = {} if open_files is None else {"open_files_limit": open_files}
        log.info("daemon_started", **(ports or {}), **limit, domains=self.domains(),
                 replica=self._shared.replica,
                 default_schedule=self._settings.sync_cron or f"every {self._settings.sync_interval:g}s")

    def domains(self) -> tuple[str, ...]:
        """The domains scheduled now."""
        return self._domains

    def domains_complete(self) -> bool:
        """False while a region's last listing failed: a domain of it may be missing."""
        return not self._stale

    def scheduled(self) -> tuple[str, ...]:
        """The lists this replica syncs, as "domain/list"."""
        return tuple(sorted(self._lists))

    async def _schedule(self, planned: Planned) -> set[ListRef]:
        """Make the lists synced match the plans: add new (domain, list)s, take the new schedule
        of those whose region or schedule changed, drop those no longer planned (and forget their
        failures and gauges), and put them all on the shared schedule. A region whose listing
        failed keeps the domains scheduled from it (the planner's last known ones and those
        scheduled now): only a complete listing removes a domain. Returns the (domain, list)s
        newly scheduled."""
        plans = list(planned.domains)
        self._stale = planned.stale
        if planned.stale:
            planned_names = {plan.name for plan in plans}
            kept = [entry.plan for entry in self._lists.values()
                    if entry.plan.discovered and entry.plan.api_base in planned.stale
                    and entry.plan.name not in planned_names]
            plans.extend({plan.name: plan for plan in kept}.values())
            if kept:
                log.warning("stale_domains_kept", regions=list(planned.stale),
                            domains=sorted({plan.name for plan in kept}))
        for api_base in planned.discovered:
            self._metrics.discovery_stale.labels(api_base=api_base).set(int(api_base in planned.stale))
        self._metrics.domain_refreshes.labels(outcome="stale" if planned.stale else "ok").inc()
        # Every trigger first: a bad schedule changes nothing.
        triggers = {plan.name: build_trigger(self._settings, plan) for plan in plans}
        wanted = {f"{plan.name}/{kind.value}": _Scheduled(plan, kind, triggers[plan.name])
                  for plan in plans for kind in plan.lists}
        await self._shared.plan([
            PlannedList(entry.plan.name, entry.kind.value, schedule_of(entry.trigger),
                        lease_for(entry.trigger), first_in(self._settings.sync_jitter))
            for entry in wanted.values()])
        for job, entry in list(self._lists.items()):
            if job not in wanted:
                del self._lists[job]
                self._failures.pop(entry.ref, None)
                self._metrics.forget_list(entry.ref)
                log.info("list_unscheduled", job=job)
        added = {entry.ref for job, entry in wanted.items() if job not in self._lists}
        self._lists.update(wanted)
        self._domains = tuple(sorted({plan.name for plan in plans if plan.lists}))
        self._claimable = tuple(sorted({entry.plan.name for entry in self._lists.values()}))
        return added

    async def refresh_domains(self) -> None:
        """Plan again: schedule new domains and lists, reschedule changed ones, drop the ones gone."""
        try:
            if await self._schedule(await self._planner()):
                await self.refresh_gauges()
            await self._warn_of_unsynced_rows()
        except SyncError as exc:  # keep syncing what is scheduled; try again next time
            self._metrics.domain_refreshes.labels(outcome="failed").inc()
            log.error("domains_not_refreshed", error=str(exc))
        except asyncio.CancelledError:  # a stop; what is scheduled stays as it was
            log.warning("domains_refresh_cancelled", reason="the daemon is stopping")
        except Exception:  # the daemon outlives a broken refresh, like a broken run
            log.exception("domains_refresh_crashed")

    async def _warn_of_unsynced_rows(self) -> None:
        """At the start and each refresh, as `run` does: rows of a domain nobody syncs wait
        forever. Not while a region's listing is stale (its domains may be missing)."""
        if self._stale:
            return
        try:
            await warn_of_unsynced_rows(self._resources.store, self._domains)
        except SyncError as exc:  # a warning only: the next refresh tries again
            log.warning("unsynced_rows_not_counted", error=str(exc))

    def _reconciler(self, plan: DomainPlan) -> Reconciler:
        if plan.api_base not in self._reconcilers:
            self._reconcilers[plan.api_base] = Reconciler(
                self._resources.store, self._resources.mailgun_for(plan.api_base), self._options)
        return self._reconcilers[plan.api_base]

    async def _claim_due(self) -> None:
        """Renew the claims of the runs in progress, and start the lists that are due, as many as
        there is room for."""
        if self._stopping:
            return
        # Cancelled by a stop past its grace: the lists it claimed run out their lease.
        with self._tracked(), contextlib.suppress(asyncio.CancelledError):
            await self._claim_and_start()

    async def _claim_and_start(self) -> None:
        room = RUN_SLOTS - len(self._runs)
        try:
            await self._shared.renew(claim for claim, _ in self._runs.values())
            claims = await self._shared.claim(room, self._claimable) if room > 0 else []
        except SyncError as exc:  # again at the next claim; said once a minute, not twice a second
            now = time.monotonic()
            if self._unread_since is None or now - self._unread_said >= 60.0:
                log.warning("schedule_not_read", error=str(exc))
                self._unread_said = now
            self._unread_since = self._unread_since or now
            return
        if self._unread_since is not None:
            log.info("schedule_read_again", after_s=round(time.monotonic() - self._unread_since, 1))
            self._unread_since = None
        if self._stopping:  # a stop began while it claimed: its runs are not waited for
            await self._give_back(claims)
            return
        for claim in claims:
            job = f"{claim.domain}/{claim.list}"
            entry = self._lists.get(job)
            if entry is None:
                # A list of a domain it syncs that it does not (another replica's configuration
                # names more lists): its claim runs out after a lease, for a replica that syncs it.
                continue
            if job in self._runs:
                # Its run outlasted the lease: it sets the next due time when it ends.
                self._metrics.runs_skipped.labels(**entry.ref.labels, reason="still_running").inc()
                log.warning("scheduled_run_skipped", **entry.ref.labels, reason="still_running")
                continue
            started = asyncio.create_task(self._sync(entry, claim), name=f"reconcile {job}")
            self._runs[job] = (claim, started)
            self._running.add(started)

    async def _sync(self, entry: _Scheduled, claim: Claim) -> None:
        ref = entry.ref
        clock = time.perf_counter()
        ran = False
        try:
            result = await self._reconciler(entry.plan).reconcile(uuid.uuid4(), ref.domain, ref.list)
            seconds = time.perf_counter() - clock
            # Held by another process (a CronJob, a run past its lease): the claim stands, and the
            # list is tried again when it runs out.
            ran = result.status is not RunStatus.SKIPPED
            if result.status in (RunStatus.FAILED, RunStatus.GUARDED):
                self._failed(ref)
            elif result.status is RunStatus.OK:
                self._failed(ref, reset=True)
            # The pending count first, so a scrape never shows a run without it; a count that
            # fails says nothing about the run.
            try:
                pending, _ = await self._resources.store.count_states(ref)
                self._metrics.observe_pending(ref, pending)
            except SyncError as exc:
                log.warning("pending_rows_not_counted", **ref.labels, error=str(exc))
            self._metrics.observe_run(result, seconds)
        except SyncError as exc:
            ran = True
            self._failed(ref)
            log.error("scheduled_run_failed", **ref.labels, error=str(exc))
        except asyncio.CancelledError:
            # Only a stop cancels a run (past SHUTDOWN_GRACE); the run has logged itself failed,
            # and the drain gives its claim back.
            self._failed(ref)
            raise
        except Exception:  # the per-run guard: one broken run must not stop the daemon
            ran = True
            self._failed(ref)
            log.exception("scheduled_run_crashed", **ref.labels)
        finally:
            task = asyncio.current_task()
            self._runs.pop(entry.job, None)
            if task is not None:
                self._running.discard(task)
        if ran:
            ended = claim.claimed_at + timedelta(seconds=time.perf_counter() - clock)
            try:
                await self._shared.ran(claim, next_due(entry.trigger, claim, ended),
                                       schedule_of(entry.trigger))
            except SyncError as exc:  # the claim runs out and the list is taken again
                log.warning("next_run_not_scheduled", **ref.labels, error=str(exc))

    def _failed(self, ref: ListRef, *, reset: bool = False) -> None:
        """Count a list's runs that did not end ok in a row (for metrics and alerts)."""
        self._failures[ref] = 0 if reset else self._failures.get(ref, 0) + 1
        self._metrics.observe_failures(ref, self._failures[ref])

    async def refresh_gauges(self) -> None:
        """Each synced list's gauges from the mirror: its last success and its runs in a row not
        ending ok (from mailgun.last_runs), its pending rows. Every replica exports every list's
        gauges, and each list's runs are shared among them: read from the database, the gauges
        agree whichever replica ran the list, also across restarts. Lists the run log knows but
        the daemon does not sync get no gauge: an alert would fire forever."""
        try:
            health = await self._resources.store.list_health()
            states = {kind: await self._resources.store.count_states_by_domain(kind)
                      for kind in {entry.kind for entry in self._lists.values()}}
        except SyncError as exc:  # read again at the next turn
            log.warning("list_gauges_not_read", error=str(exc))
            return
        for entry in list(self._lists.values()):
            ref = entry.ref
            last_ok, in_a_row = health.get((ref.domain, ref.list.value), (None, 0))
            if last_ok is not None:
                self._metrics.last_success.labels(**ref.labels).set(last_ok.timestamp())
            self._failures[ref] = in_a_row
            self._metrics.observe_failures(ref, in_a_row)
            self._metrics.observe_pending(ref, states[ref.list].get(ref.domain, (0, 0))[0])

    async def _refresh_gauges_job(self) -> None:
        if self._stopping:
            return
        with self._tracked(), contextlib.suppress(asyncio.CancelledError):  # a stop past its grace
            await self.refresh_gauges()

    async def prune(self) -> None:
        """Delete the change log and run records past the retention (worker/retention.py)."""
        if self._stopping:
            return
        with self._tracked():
            try:
                report = await prune(self._resources.pool, self._settings.retention_days)
                self._metrics.observe_prune(report)
            except SyncError as exc:  # try again at the next turn
                log.error("retention_prune_failed", error=str(exc))
            except asyncio.CancelledError:  # a stop; each batch is a transaction of its own
                log.warning("retention_prune_cancelled", reason="the daemon is stopping")
            except Exception:  # the daemon outlives a broken prune, like a broken run
                log.exception("retention_prune_crashed")

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        """Around a scheduled job's work: a stop waits for it, within its grace, then cancels it."""
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            yield
        finally:
            self._running.discard(task)

    async def readiness(self) -> str | None:
        """Why this process cannot serve, or None when it can: it has planned its domains and
        PostgreSQL answers. A failing list does not make it unready (that would take the webhooks
        of every domain down with it): list health is in the metrics and `status`."""
        if not self._started:
            return "starting: planning the domains to sync"
        try:
            await ping(self._resources.serving, within=READY_WITHIN)
        except DatabaseError as exc:
            return f"database unreachable: {exc}"
        return None

    async def drain(self, grace: float) -> None:
        """Stop scheduling, give the runs in progress `grace` seconds, cancel the rest."""
        self._stopping = True
        if not self._scheduler.running:
            return
        self._scheduler.pause()
        running = set(self._running)
        if running:
            log.info("draining", runs=len(running), grace_s=grace)
            _, late = await asyncio.wait(running, timeout=grace)
            given_back = [claim for claim, task in self._runs.values() if task in late]
            for task in late:
                task.cancel()
            if late:
                log.warning("runs_cancelled_at_shutdown", runs=len(late))
                _, stuck = await asyncio.wait(late, timeout=CANCELLED_RUNS_WITHIN)
                if stuck:
                    # Waiting on a connection that no longer answers: closing the pools, next,
                    # terminates it, which ends them.
                    log.error("runs_abandoned_at_shutdown", runs=len(stuck),
                              reason=f"not over {CANCELLED_RUNS_WITHIN:g} s after being cancelled")
            await self._give_back(given_back)
        self._scheduler.shutdown(wait=False)

    async def _give_back(self, claims: list[Claim]) -> None:
        """The lists whose runs a stop cancelled are due again at once, for another replica (a
        rolling update hands them over now, not after a lease), if the database answers soon."""
        if not claims:
            return
        try:
            await self._shared.release(claims, within=GIVE_BACK_WITHIN)
        except SyncError as exc:  # they run out after a lease
            log.warning("claims_not_given_back", lists=len(claims), error=str(exc))
