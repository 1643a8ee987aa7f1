"""Prometheus metrics of one process, in a registry of its own (no global state)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from worker.reconcile import ListResult
from worker.records import ListRef
from worker.retention import PruneReport
from worker.runs import RunStatus

# Run durations range from a second (a small list) to many minutes (millions of records).
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# A webhook is answered in milliseconds, unless the database is slow (it gives up at 4 s).
WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.runs = Counter(
            "mailgun_sync_runs", "Reconciles of one (domain, list), by outcome.",
            ["domain", "list", "status"], registry=self.registry)
        self.records = Counter(
            "mailgun_sync_records",
            "Records handled, by action (`skipped`: listed by Mailgun, not held by the mirror).",
            ["domain", "list", "action"], registry=self.registry)
        self.duration = Histogram(
            "mailgun_sync_run_duration_seconds", "How long one reconcile of one (domain, list) took.",
            ["domain", "list"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.last_success = Gauge(
            "mailgun_sync_last_success_timestamp_seconds",
            "When a reconcile of this (domain, list) last ended ok (Unix time).",
            ["domain", "list"], registry=self.registry)
        self.pending = Gauge(
            "mailgun_sync_pending_rows", "Local additions not yet confirmed by Mailgun.",
            ["domain", "list"], registry=self.registry)
        self.http_requests = Counter(
            "mailgun_sync_http_requests", "Requests sent to Mailgun, by method and answer.",
            ["method", "status"], registry=self.registry)
        self.tasks = Gauge(
            "mailgun_sync_asyncio_tasks", "asyncio tasks alive when the metrics were read.",
            registry=self.registry)
        self.http_retries = Counter(
            "mailgun_sync_http_retries", "Mailgun requests tried again, by the answer that caused it.",
            ["status"], registry=self.registry)
        self.consecutive_failures = Gauge(
            "mailgun_sync_consecutive_failures",
            "Runs of this (domain, list) in a row that did not end ok (failed, guarded or crashed).",
            ["domain", "list"], registry=self.registry)
        self.runs_skipped = Counter(
            "mailgun_sync_runs_skipped",
            "Scheduled runs not started: the previous run of the list was still going, or missed.",
            ["domain", "list", "reason"], registry=self.registry)
        self.discovery_stale = Gauge(
            "mailgun_sync_discovery_stale",
            "1 when the last listing of the account's domains in this region failed (the domains of "
            "the last complete one are kept), else 0.",
            ["api_base"], registry=self.registry)
        self.domain_refreshes = Counter(
            "mailgun_sync_domain_refreshes",
            "Plans of the domains to sync, by outcome: ok, stale (a region kept its last known "
            "domains) or failed (the schedule was kept as it was).",
            ["outcome"], registry=self.registry)
        self.webhooks = Counter(
            "mailgun_sync_webhooks", "Webhook deliveries, by event and outcome.",
            ["event", "outcome"], registry=self.registry)
        self.webhook_duration = Histogram(
            "mailgun_sync_webhook_duration_seconds",
            "How long a webhook request took to answer, from its arrival, by the answer's status.",
            ["status"], buckets=WEBHOOK_BUCKETS, registry=self.registry)
        self.webhooks_unverified = Counter(
            "mailgun_sync_webhooks_unverified",
            "Webhook requests refused before any database work because no signature could verify, "
            "by reason: too_large, not_json, missing (no signature or its fields), mismatch, stale "
            "(a timestamp outside WEBHOOK_MAX_AGE).",
            ["reason"], registry=self.registry)
        self.pruned = Counter(
            "mailgun_sync_pruned_rows", "Rows deleted past SYNC_RETENTION_DAYS, by table.",
            ["table"], registry=self.registry)

    def observe_run(self, result: ListResult, seconds: float) -> None:
        labels = {"domain": result.domain, "list": result.list}
        self.runs.labels(status=result.status, **labels).inc()
        self.duration.labels(**labels).observe(seconds)
        for action, count in result.by_name().items():
            if count:
                self.records.labels(action=action, **labels).inc(count)
        if result.status is RunStatus.OK:
            self.last_success.labels(**labels).set(time.time())

    def observe_failures(self, ref: ListRef, in_a_row: int) -> None:
        self.consecutive_failures.labels(**ref.labels).set(in_a_row)

    def forget_list(self, ref: ListRef) -> None:
        """A list no longer synced: its gauges would otherwise alert forever (a failure count that
        never resets, a last success that only grows older, pending rows never pushed)."""
        for gauge in (self.consecutive_failures, self.last_success, self.pending):
            with contextlib.suppress(KeyError):
                gauge.remove(ref.domain, ref.list.value)

    def observe_webhook(self, event: str, outcome: str) -> None:
        self.webhooks.labels(event=event, outcome=outcome).inc()

    def observe_webhook_answer(self, status: int, seconds: float) -> None:
        self.webhook_duration.labels(status=str(status)).observe(seconds)

    def observe_unverified(self, reason: str) -> None:
        self.webhooks_unverified.labels(reason=reason).inc()

    def observe_prune(self, report: PruneReport) -> None:
        for table in report.tables:
            self.pruned.labels(table=table.table).inc(table.rows)

    def observe_pending(self, ref: ListRef, rows: int) -> None:
        self.pending.labels(**ref.labels).set(rows)

    # The Mailgun client's observer interface.
    def on_response(self, method: str, status: int | None) -> None:
        self.http_requests.labels(method=method, status=str(status) if status else "error").inc()

    def on_retry(self, status: int | None) -> None:
        self.http_retries.labels(status=str(status) if status else "error").inc()

    def exposition(self) -> bytes:
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to count
            self.tasks.set(len(asyncio.all_tasks()))
        return generate_latest(self.registry)
