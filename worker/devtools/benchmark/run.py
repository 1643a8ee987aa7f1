"""The benchmark: N synthetic bounces at the emulator against a mirror of about N rows with 1 % drift
each way (1 % only at Mailgun, 1 % pending local additions, 1 % gone from Mailgun), reconciled by
the worker and, on the same workload in the same run, by the hand-written baseline.

Both run as child processes, so wall time, CPU time and peak RSS are theirs alone (os.wait4);
the emulator runs in a third process, as Mailgun would be elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson

from worker.database import open_pool
from worker.devtools.scratch import scratch_database
from worker.devtools.sql import queries
from worker.migrate import migrate

DOMAIN = "mg.bench.example"
API_KEY = "key-bench"
BASELINE_AUTO_LIMIT = 200_000


@dataclass
class Measured:
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    exit_code: int
    pages: int = 0
    reconcile_s: float | None = None
    records_per_s: float | None = None
    steps: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _measure(argv: list[str], env: dict[str, str]) -> tuple[Measured, str, str]:
    """Run a child to its end; its own wall time, CPU time and peak RSS, and its output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        measured = Measured(wall_s=round(wall, 3), cpu_s=round(usage.ru_utime + usage.ru_stime, 3),
                            peak_rss_mb=round(usage.ru_maxrss / 1024, 1), exit_code=child.returncode)
        return measured, out.read().decode(), err.read().decode()


class Emulator:
    """The emulator in its own process, driven through its control endpoints."""

    def __init__(self, records: int, latency_ms: float, domains: tuple[str, ...] = (DOMAIN,)) -> None:
        """`records` bounces of the first of `domains`."""
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._argv = [sys.executable, "-m", "worker", "--log-level", "WARNING", "emulator",
                      "--port", str(self.port), *(f"--domain={d}" for d in domains), "--api-key", API_KEY,
                      "--generate", f"bounces={records}", "--latency-ms", str(latency_ms),
                      "--rate-limit", "1000000000"]
        self._records = records
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Emulator:
        self._process = await asyncio.create_subprocess_exec(
            *self._argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while True:
            try:
                await self.state()
                return self
            except aiohttp.ClientError:
                if self._process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError("the emulator did not start") from None
                await asyncio.sleep(0.2)

    async def __aexit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            await asyncio.wait_for(self._process.wait(), 10)

    async def _call(self, method: str, path: str, body: object = None) -> Any:
        async with aiohttp.ClientSession() as session, session.request(
                method, f"{self.base_url}/_emulator/{path}", json=body) as response:
            response.raise_for_status()
            return await response.json()

    async def state(self) -> Any:
        return await self._call("GET", "state")

    async def configure(self, **settings: Any) -> None:
        await self._call("PATCH", "settings", settings)

    async def served_gets(self) -> int:
        served: dict[str, int] = (await self.state())["served"]
        return served.get("GET", 0)

    async def fault(self, fault: dict[str, Any]) -> None:
        await self._call("POST", "faults", fault)

    async def clear_faults(self) -> None:
        await self._call("DELETE", "faults")

    async def seed(self, data: dict[str, Any]) -> None:
        await self._call("POST", "seed", data)

    async def addresses(self) -> list[str]:
        records = await self._call("GET", f"records/{DOMAIN}/bounces")
        return [r["address"] for r in records]

    async def generate(self, domain: str, kind: str, count: int) -> None:
        await self._call("POST", "generate", {"domain": domain, "list": kind, "count": count})

    async def regenerate(self) -> None:
        await self._call("POST", "reset")
        await self._call("POST", "generate", {"domain": DOMAIN, "list": "bounces", "count": self._records})


async def _prepare_mirror(pool: asyncpg.Pool, records: int, pending: int, deletions: int = 0) -> None:
    await pool.execute(queries()["bench_reset_mirror"])
    await pool.execute(queries()["bench_prepare_mirror"], DOMAIN, records, pending)
    if deletions:
        await pool.execute(queries()["bench_delete_locally"], DOMAIN, deletions)
    await pool.execute(queries()["bench_vacuum"])


def _env(emulator: Emulator, database_url: str) -> dict[str, str]:
    return {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": emulator.base_url,
            "MAILGUN_DOMAINS": DOMAIN, "DATABASE_URL": database_url, "SYNC_MAX_DELETE_FRACTION": "0.5"}


async def _run_worker(emulator: Emulator, database_url: str, records: int, *,
                      allow_mass_delete: bool = False) -> Measured:
    before = await emulator.served_gets()
    argv = [sys.executable, "-m", "worker", "run", "--list", "bounces", "--json",
            *(["--allow-mass-delete"] if allow_mass_delete else [])]
    measured, out, err = await asyncio.to_thread(_measure, argv, _env(emulator, database_url))
    measured.pages = await emulator.served_gets() - before
    if out.strip():
        measured.result = orjson.loads(out)["results"][0]
    for line in err.splitlines():
        if '"list_reconciled"' in line:
            summary = orjson.loads(line)
            measured.reconcile_s = summary["seconds"]
            measured.steps = summary.get("steps", {})
    if measured.reconcile_s:
        measured.records_per_s = round(records / measured.reconcile_s)
    return measured


async def _run_baseline(emulator: Emulator, database_url: str, records: int) -> Measured:
    before = await emulator.served_gets()
    argv = [sys.executable, "-m", "worker.devtools.benchmark.baseline"]
    measured, out, err = await asyncio.to_thread(_measure, argv, _env(emulator, database_url))
    if measured.exit_code != 0:
        raise RuntimeError(f"the baseline failed: {err.strip()[-500:]}")
    measured.pages = await emulator.served_gets() - before
    measured.result = orjson.loads(out)
    measured.reconcile_s = measured.wall_s
    measured.records_per_s = round(records / measured.wall_s)
    return measured


async def run_benchmark(*, records: int, pending: int | None = None, page_latency_ms: float = 0.0,
                        baseline: bool | None = None, database_url: str | None = None,
                        deletions: int = 0) -> dict[str, Any]:
    """With `deletions`, the application has also deleted that many synced rows Mailgun has, and
    the run (with --allow-mass-delete) deletes them at Mailgun; the baseline does no deletions."""
    pending = records // 100 if pending is None else pending
    with_baseline = records <= BASELINE_AUTO_LIMIT and not deletions if baseline is None else baseline
    async with scratch_database("mailgun_sync_bench", database_url) as url, \
            open_pool(url, max_size=2) as pool, Emulator(records, page_latency_ms) as emulator:
        await migrate(pool)
        server_version = await pool.fetchval(queries()["server_version"])
        await _prepare_mirror(pool, records, pending, deletions)
        worker = await _run_worker(emulator, url, records, allow_mass_delete=deletions > 0)
        baseline_run = None
        if with_baseline:
            await emulator.regenerate()
            await _prepare_mirror(pool, records, pending)
            baseline_run = await _run_baseline(emulator, url, records)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "postgresql": server_version, "system": platform.platform()},
        "records": records, "pending": pending, "deletions": deletions, "page_latency_ms": page_latency_ms,
        "worker": asdict(worker),
        "baseline": asdict(baseline_run) if baseline_run else None,
    }
    if baseline_run and worker.reconcile_s:
        report["speedup"] = round(baseline_run.wall_s / worker.reconcile_s, 1)
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['records']:,} bounces, {report['pending']:,} pending, "
             f"{report['page_latency_ms']:g} ms per request; {report['machine']['cpus']} cores, "
             f"PostgreSQL {report['machine']['postgresql']}, Python {report['machine']['python']}",
             "",
             f"{'':<10} {'reconcile s':>12} {'process s':>10} {'CPU s':>8} {'peak RSS MB':>12} "
             f"{'pages':>7} {'records/s':>11}"]
    for name in ("worker", "baseline"):
        run = report[name]
        if run is None:
            continue
        lines.append(f"{name:<10} {run['reconcile_s'] or 0:>12.2f} {run['wall_s']:>10.2f} "
                     f"{run['cpu_s']:>8.2f} {run['peak_rss_mb']:>12.1f} {run['pages']:>7} "
                     f"{run['records_per_s'] or 0:>11,}")
    worker = report["worker"]
    if worker["steps"]:
        lines.append("worker steps: " + ", ".join(f"{k} {v:.2f} s" for k, v in worker["steps"].items()))
    if worker["result"]:
        r = worker["result"]
        lines.append(f"worker result: {r['status']}, inserted {r['inserted']}, removed {r['removed']}, "
                     f"pushed {r['pushed']}, deleted at Mailgun {r['deleted']}")
        seconds = worker["steps"].get("delete")
        if r["deleted"] and seconds:
            lines.append(f"deletions at Mailgun: {r['deleted']:,} in {seconds:.2f} s, "
                         f"{r['deleted'] / seconds:,.0f}/s")
    if "speedup" in report:
        lines.append(f"speedup over the baseline: {report['speedup']}x")
    return "\n".join(lines) + "\n"
