"""The retention benchmark: a throwaway database's change log filled (in SQL) with N rows past a
30-day retention and M fresh ones, plus run records, then pruned as `mailgun-sync prune` and the
daemon do (worker/retention.py).

A writer in this process inserts change rows as webhooks do (one committed row each, at a steady
rate over a few connections) first alone and then while the pruning runs, so the two latency
distributions compare side by side in one run. Latency counts from when each write was due, so
a writer held up by the pruning shows it. The benchmark also times building the retention
migration's indexes on the filled log: what upgrading costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import time
import uuid
from dataclasses import asdict
from typing import Any

import asyncpg

from worker.database import open_pool
from worker.devtools.scratch import scratch_database
from worker.devtools.sql import queries
from worker.migrate import migrate
from worker.retention import PruneReport, prune
from worker.sql import migrations

RETENTION_DAYS = 30
RETENTION_MIGRATION = 7


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


class Writer:
    """Change rows inserted at `rate` per second over at most `connections` connections."""

    def __init__(self, pool: asyncpg.Pool, rate: float, connections: int) -> None:
        self._pool = pool
        self._rate = rate
        self._slots = asyncio.Semaphore(connections)
        self._written = 0

    async def run(self, until: asyncio.Future[Any]) -> dict[str, Any]:
        """Write until `until` is done; the latency of every write."""
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        errors = 0

        async def one(due: float) -> None:
            nonlocal errors
            self._written += 1
            address = f"writer{self._written}@example.com"
            async with self._slots:
                try:
                    await self._pool.execute(queries()["bench_prune_write"], uuid.uuid4(), address)
                except (asyncpg.PostgresError, OSError):
                    errors += 1
            latencies.append(loop.time() - due)

        started = loop.time()
        tasks: list[asyncio.Task[None]] = []
        while not until.done():
            due = started + len(tasks) / self._rate
            if due > loop.time():
                await asyncio.wait([until], timeout=due - loop.time())
                continue
            tasks.append(asyncio.create_task(one(due)))
            await asyncio.sleep(0)  # behind schedule, still let the writes and the pruning run
        await asyncio.gather(*tasks)
        return {"writes": len(tasks), "errors": errors, "seconds": round(loop.time() - started, 2),
                "latency_ms": {"p50": round(1000 * _percentile(latencies, 0.50), 2),
                               "p99": round(1000 * _percentile(latencies, 0.99), 2),
                               "max": round(1000 * max(latencies, default=0.0), 2)}}


async def _fill(pool: asyncpg.Pool, old: int, fresh: int, runs: int) -> float:
    """Fill the log; returns the seconds building the retention indexes on it took."""
    await pool.execute(queries()["bench_prune_drop_indexes"])
    await pool.execute(queries()["bench_prune_fill_changes"], old, fresh)
    await pool.execute(queries()["bench_prune_fill_runs"], runs)
    [retention] = [m for m in migrations() if m.version == RETENTION_MIGRATION]
    clock = time.perf_counter()
    await pool.execute(retention.sql)
    built = time.perf_counter() - clock
    await pool.execute(queries()["bench_prune_vacuum"])
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await pool.execute(queries()["bench_checkpoint"])
    return built


async def _timed_prune(pool: asyncpg.Pool) -> tuple[float, PruneReport]:
    started = time.perf_counter()
    report = await prune(pool, RETENTION_DAYS)
    return time.perf_counter() - started, report


async def run_benchmark(*, old: int, fresh: int | None = None, runs: int | None = None,
                        rate: float = 200.0, connections: int = 8, baseline_seconds: float = 10.0,
                        database_url: str | None = None) -> dict[str, Any]:
    fresh = old // 10 if fresh is None else fresh
    runs = max(100, old // 100) if runs is None else runs
    async with scratch_database("mailgun_sync_prune", database_url) as url, \
            open_pool(url, max_size=connections + 1) as pool:
        await migrate(pool)
        server_version = await pool.fetchval(queries()["server_version"])
        index_build_s = await _fill(pool, old, fresh, runs)
        writer = Writer(pool, rate, connections)
        alone = await writer.run(asyncio.ensure_future(asyncio.sleep(baseline_seconds)))
        pruning = asyncio.ensure_future(_timed_prune(pool))
        during = await writer.run(pruning)
        wall, pruned = pruning.result()
        left = await pool.fetchrow(queries()["bench_prune_left"], pruned.cutoff)
    tables = {t.table: asdict(t) for t in pruned.tables}
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "postgresql": server_version, "system": platform.platform()},
        "old": old, "fresh": fresh, "runs": runs, "retention_days": RETENTION_DAYS,
        "index_build_s": round(index_build_s, 2),
        "prune": {"wall_s": round(wall, 2), "rows": pruned.rows,
                  "rows_per_s": round(pruned.rows / wall) if wall else 0,
                  "batches": sum(t["batches"] for t in tables.values()),
                  "longest_statement_ms": round(
                      1000 * max(t["longest_statement_s"] for t in tables.values()), 1),
                  "tables": tables},
        "writer": {"rate": rate, "connections": connections, "alone": alone, "while_pruning": during},
        "left": dict(left),
        "ok": (left["old"] == 0 and left["fresh"] == fresh
               and left["written"] == alone["writes"] + during["writes"]
               and alone["errors"] == during["errors"] == 0),
    }


def render(report: dict[str, Any]) -> str:
    prune, writer = report["prune"], report["writer"]
    machine = report["machine"]
    lines = [
        f"change log: {report['old']:,} rows past {report['retention_days']} days and "
        f"{report['fresh']:,} fresh; {report['runs']:,} run records; {machine['cpus']} cores, "
        f"PostgreSQL {machine['postgresql']}, Python {machine['python']}",
        f"retention indexes built on it in {report['index_build_s']:.2f} s",
        f"pruned {prune['rows']:,} rows in {prune['wall_s']:.2f} s ({prune['rows_per_s']:,} rows/s), "
        f"{prune['batches']:,} batches, longest statement {prune['longest_statement_ms']:.1f} ms",
        f"writer at {writer['rate']:g}/s over {writer['connections']} connections, latency:",
    ]
    for name, label in (("alone", "alone"), ("while_pruning", "while pruning")):
        run = writer[name]
        latency = run["latency_ms"]
        lines.append(f"  {label:<14} {run['writes']:>8,} writes  p50 {latency['p50']:7.2f} ms  "
                     f"p99 {latency['p99']:7.2f} ms  max {latency['max']:8.2f} ms  errors {run['errors']}")
    lines.append("ok" if report["ok"] else f"NOT OK: left {report['left']}")
    return "\n".join(lines) + "\n"
