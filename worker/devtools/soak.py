"""`mailgun-sync soak`: the daemon against the emulator with a share of requests failing, for a
while, watching that every list converges and that memory, connections and tasks stay flat.

The daemon runs as a child process; its RSS and open file descriptors are read from /proc, its
asyncio tasks from its own /metrics.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from worker.database import open_pool
from worker.devtools.benchmark.run import DOMAIN, Emulator, _env, _free_port, _prepare_mirror
from worker.devtools.scratch import scratch_database
from worker.devtools.sql import queries
from worker.migrate import migrate


def _proc_sample(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss_kb / 1024, sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


async def _tasks(port: int) -> int | None:
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/metrics") as response:
            for line in (await response.text()).splitlines():
                if line.startswith("mailgun_sync_asyncio_tasks "):
                    return int(float(line.split()[1]))
    except aiohttp.ClientError:
        return None
    return None


async def run_soak(*, seconds: float, failure_rate: float = 0.05, records: int = 20_000,
                   database_url: str | None = None) -> dict[str, Any]:
    port = _free_port()
    async with scratch_database("mailgun_sync_soak", database_url) as url, \
            open_pool(url, max_size=2) as pool, Emulator(records, 0.0) as emulator:
        await migrate(pool)
        await _prepare_mirror(pool, records, records // 100)
        await emulator.fault({"action": "status", "status": 503, "times": None,
                              "probability": failure_rate})
        env = {**_env(emulator, url), "SYNC_INTERVAL": "1", "SYNC_JITTER": "0.2",
               "HTTP_PORT": str(port), "MAILGUN_BACKOFF_MAX": "0.5", "MAILGUN_MAX_ATTEMPTS": "4"}
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "--log-level", "WARNING", "daemon", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        samples: list[dict[str, float | int | None]] = []
        started = time.monotonic()
        added = 0
        try:
            while time.monotonic() - started < seconds:
                # The tasks five times over the second: at rest, between runs, at least once.
                tasks: list[int] = []
                for _ in range(5):
                    await asyncio.sleep(0.2)
                    if (alive := await _tasks(port)) is not None:
                        tasks.append(alive)
                # Both sides keep changing: one new local addition and one new Mailgun record a second.
                await pool.execute(queries()["soak_local_addition"], DOMAIN, added)
                await emulator.seed({"domains": {DOMAIN: {"bounces": [
                    {"address": f"soak-remote{added:06d}@example.com"}]}}})
                added += 1
                rss, fds = _proc_sample(daemon.pid)
                samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": round(rss, 1),
                                "fds": fds, "tasks": min(tasks, default=None)})
            await emulator.clear_faults()
            converged = await _wait_converged(pool, emulator, deadline=time.monotonic() + 60)
        finally:
            daemon.terminate()
            exit_code = await asyncio.wait_for(daemon.wait(), 60)
        runs = {r["status"]: r["n"] for r in await pool.fetch(queries()["soak_runs_by_status"])}
    warm = samples[len(samples) // 5] if samples else {}
    last = samples[-1] if samples else {}
    return {
        "seconds": seconds, "failure_rate": failure_rate, "records": records, "added_each_side": added,
        "runs": runs, "converged": converged, "daemon_exit_code": exit_code,
        "rss_mb": {"after_warm_up": warm.get("rss_mb"), "end": last.get("rss_mb")},
        "open_fds": {"after_warm_up": warm.get("fds"), "end": last.get("fds")},
        "asyncio_tasks": {"after_warm_up": _at_rest(samples[len(samples) // 5:2 * len(samples) // 5]),
                          "end": _at_rest(samples[-max(2, len(samples) // 5):])},
        "samples": samples,
    }


def _at_rest(samples: list[dict[str, Any]]) -> int | None:
    """Tasks alive when no run was in flight: the fewest sampled over a stretch (a run in flight
    holds a dozen for a moment; a leak shows at rest)."""
    counts = [s["tasks"] for s in samples if s.get("tasks") is not None]
    return min(counts) if counts else None


async def _wait_converged(pool: Any, emulator: Emulator, *, deadline: float) -> bool:
    while time.monotonic() < deadline:
        mirror = {r["address"] for r in await pool.fetch(queries()["soak_mirror"], DOMAIN)}
        remote = set(await emulator.addresses())
        if mirror == remote and not await pool.fetchval(queries()["soak_pending"], DOMAIN):
            return True
        await asyncio.sleep(1.0)
    return False


def render(report: dict[str, Any]) -> str:
    rss, fds, tasks = report["rss_mb"], report["open_fds"], report["asyncio_tasks"]
    return (f"soak: {report['seconds']:g} s, {report['failure_rate']:.0%} of requests failing, "
            f"{report['records']:,} records, +{report['added_each_side']} on each side\n"
            f"runs by status: {report['runs']}\n"
            f"converged after the faults stopped: {report['converged']}; daemon exit code "
            f"{report['daemon_exit_code']}\n"
            f"RSS MB {rss['after_warm_up']} -> {rss['end']}; open fds {fds['after_warm_up']} -> "
            f"{fds['end']}; asyncio tasks {tasks['after_warm_up']} -> {tasks['end']}\n")
