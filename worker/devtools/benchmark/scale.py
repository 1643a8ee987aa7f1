"""`mailgun-sync bench-scale`: daemon replicas sharing one account's lists.

The emulator in its own process holds `--domains` domains; the replicas are child processes on a
throwaway database, finding the domains by discovery (GET /v3/domains, read across its pages), as
a platform with a domain per customer would. The report: runs per list per interval (1.0 is each
list once an interval, in a run much longer than the interval); runs repeated within an interval
(0: no list run twice in one interval, in any run); requests per interval and the 429s among
them; the time from the start to the first run and to every list's first run; the longest a list
went without a run after a replica was killed; each replica's peak RSS and CPU; and how long
`status` then takes, as a process of its own.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from worker.database import open_pool
from worker.devtools.benchmark.run import API_KEY, Emulator
from worker.devtools.scratch import scratch_database
from worker.devtools.sql import queries
from worker.migrate import migrate
from worker.records import SYNCED_LISTS


def scale_domains(count: int) -> tuple[str, ...]:
    return tuple(f"mg{n:05}.scale.example" for n in range(count))


def _config(emulator: Emulator, interval: float) -> str:
    return (f'api_base = "{emulator.base_url}"\n\n[discover]\nregions = ["{emulator.base_url}"]\n'
            f"interval = {interval:g}\n")


def _usage(pid: int) -> dict[str, float]:
    """A live process's peak RSS (VmHWM) and CPU so far."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"peak_rss_mb": round(peak_kb / 1024, 1),
            "cpu_s": round((int(fields[11]) + int(fields[12])) / ticks, 2)}


def _repeats(starts: dict[tuple[str, str], list[datetime]], interval: float) -> int:
    """Runs of a list begun less than half an interval after its previous one: work repeated
    (a due time moves by up to SYNC_JITTER and a claim's period, so a gap a little short of the
    interval is not one)."""
    return sum(1 for times in starts.values() for a, b in itertools.pairwise(times)
               if (b - a).total_seconds() < 0.5 * interval)


def _gaps(starts: dict[tuple[str, str], list[datetime]], since: datetime, until: datetime) -> float:
    """The longest any list went without a run start between `since` and `until`."""
    longest = 0.0
    for times in starts.values():
        points = [since, *(t for t in times if since <= t < until), until]
        longest = max(longest, *((b - a).total_seconds() for a, b in itertools.pairwise(points)))
    return round(longest, 2)


async def run_benchmark(*, domains: int, replicas: int, interval: float, seconds: float,
                        kill_one: bool, rate_limit: int | None,
                        database_url: str | None) -> dict[str, Any]:
    names = scale_domains(domains)
    lists = domains * len(SYNCED_LISTS)
    async with scratch_database("mailgun_sync_scale", database_url) as url, \
            open_pool(url, max_size=2) as pool, Emulator(0, 0.0, names) as emulator:
        await migrate(pool)
        if rate_limit is not None:
            await emulator.configure(rate_limit=rate_limit)
        server_version = await pool.fetchval(queries()["server_version"])
        with tempfile.TemporaryDirectory() as scratch:
            config = Path(scratch, "sync.toml")
            await asyncio.to_thread(config.write_text, _config(emulator, interval))
            env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": emulator.base_url,
                   "SYNC_CONFIG": str(config), "DATABASE_URL": url, "HTTP_PORT": "0",
                   "SYNC_JITTER": str(min(interval / 10, 30.0)), "SHUTDOWN_GRACE": "5"}
            env.pop("MAILGUN_DOMAINS", None)
            started_at = await pool.fetchval(queries()["server_now"])
            children = [subprocess.Popen(  # noqa: ASYNC220 - started together, as a rollout starts them
                [sys.executable, "-m", "worker", "--log-level", "WARNING", "daemon"], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(replicas)]
            usage: dict[int, dict[str, float]] = {}
            killed_at: datetime | None = None
            try:
                await asyncio.sleep(seconds / 2)
                served_half = await emulator.state()
                half = await pool.fetchval(queries()["server_now"])
                if kill_one:
                    usage[0] = _usage(children[0].pid)
                    children[0].kill()
                    killed_at = half
                await asyncio.sleep(seconds / 2)
                served_end = await emulator.state()
                until = await pool.fetchval(queries()["server_now"])
                for index, child in enumerate(children):
                    if child.poll() is None:
                        usage[index] = _usage(child.pid)
            finally:
                for child in children:
                    if child.poll() is None:
                        child.send_signal(signal.SIGTERM)
                codes = [await asyncio.to_thread(child.wait) for child in children]
            # What an operator asks next: `status`, its summary, as a process of its own.
            clock = time.perf_counter()
            shown = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "worker", "status"], env=env, capture_output=True,
                check=False)
            status_s = time.perf_counter() - clock
        starts: dict[tuple[str, str], list[datetime]] = collections.defaultdict(list)
        for row in await pool.fetch(queries()["bench_run_starts"]):
            starts[(row["domain"], row["list"])].append(row["started_at"])
    # The second half: past the start's burst of first runs, the steady state.
    window = (until - half).total_seconds()
    runs = sum(1 for times in starts.values() for t in times if half <= t < until)
    requests = sum(served_end["served"].values()) - sum(served_half["served"].values())
    limited = served_end["answered"].get("429", 0) - served_half["answered"].get("429", 0)
    first = [min(times) for times in starts.values()]
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "postgresql": server_version, "system": platform.platform()},
        "domains": domains, "lists": lists, "replicas": replicas, "interval_s": interval,
        "seconds": seconds, "killed_one": kill_one, "rate_limit": rate_limit,
        "steady": {
            "window_s": round(window, 1),
            "runs_per_list_per_interval": round(runs / lists / (window / interval), 3),
            "requests_per_interval": round(requests / (window / interval), 1),
            "answered_429": limited,
        },
        "runs": sum(len(times) for times in starts.values()),
        "runs_repeated_within_an_interval": _repeats(starts, interval),
        "repeated_examples": [
            {"list": f"{key[0]}/{key[1]}", "starts": [t.isoformat() for t in times]}
            for key, times in starts.items()
            if any((b - a).total_seconds() < 0.5 * interval for a, b in itertools.pairwise(times))][:3],
        "answered_429_in_all": served_end["answered"].get("429", 0),
        "first_run_after_s": round((min(first) - started_at).total_seconds(), 2) if first else None,
        "lists_run": len(starts),
        "every_list_run_after_s": round((max(first) - started_at).total_seconds(), 2)
        if len(starts) == lists else None,
        "longest_gap_after_kill_s": _gaps(starts, killed_at, until) if killed_at else None,
        "replica_usage": [usage.get(i) for i in range(replicas)],
        "status": {"seconds": round(status_s, 2), "lines": len(shown.stdout.splitlines()),
                   "exit_code": shown.returncode},
        "exit_codes": codes,
        "ok": all(code == 0 for code in codes[kill_one:]) and shown.returncode == 0,
    }


def render(report: dict[str, Any]) -> str:
    steady = report["steady"]
    lines = [
        f"{report['replicas']} replicas, {report['domains']:,} domains x {len(SYNCED_LISTS)} lists "
        f"({report['lists']:,}), every {report['interval_s']:g} s, {report['seconds']:g} s; "
        f"{report['machine']['cpus']} cores, PostgreSQL {report['machine']['postgresql']}",
        f"first run {report['first_run_after_s']} s after the start; "
        + (f"every list run within {report['every_list_run_after_s']} s"
           if report["every_list_run_after_s"] is not None
           else f"{report['lists_run']:,} of {report['lists']:,} lists run"),
        f"steady state (last {steady['window_s']:g} s): {steady['runs_per_list_per_interval']} runs "
        f"per list per interval, {steady['requests_per_interval']:,} requests per interval, "
        f"{steady['answered_429']} answered 429 ({report['answered_429_in_all']} in all)",
        f"{report['runs']:,} runs, of which {report['runs_repeated_within_an_interval']} began "
        f"less than half an interval after the list's previous run",
    ]
    if report["longest_gap_after_kill_s"] is not None:
        lines.append(f"one replica killed halfway: longest a list went without a run after it: "
                     f"{report['longest_gap_after_kill_s']} s")
    for index, usage in enumerate(report["replica_usage"]):
        if usage:
            lines.append(f"replica {index}: peak RSS {usage['peak_rss_mb']} MB, CPU {usage['cpu_s']} s")
    status = report["status"]
    lines.append(f"`status` (a process of its own): {status['seconds']} s, {status['lines']} lines")
    lines.append("ok" if report["ok"] else f"NOT OK: exit codes {report['exit_codes']}")
    return "\n".join(lines) + "\n"
