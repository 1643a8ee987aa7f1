"""The webhook benchmark: `mailgun-sync daemon` as a child process on a throwaway database takes N
signed webhooks (bounces, complaints and unsubscribes of distinct addresses, all written) sent at
a target rate over at most C connections.

Each request's latency counts from the moment it was due to be sent, so a server that falls
behind shows it in the latency instead of slowing the sender down. The daemon's own CPU time
comes from os.wait4; every answered event is then looked for in the mirror.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson

from worker.benchmark.run import _free_port
from worker.emulator import MailgunEmulator
from worker.migrate import migrate
from worker.scratch import scratch_database
from worker.sql import queries
from worker.store import open_pool
from worker.webhook_test import event_data, signed

DOMAIN = "mg.bench.example"
API_KEY = "key-bench"
SIGNING_KEY = "bench-webhook-signing-key"
KINDS = ("failed", "complained", "unsubscribed")


def payloads(events: int) -> list[bytes]:
    """Signed deliveries, built before the clock starts."""
    return [orjson.dumps(signed(SIGNING_KEY, event_data(KINDS[i % 3], f"hook{i:08}@example.com", DOMAIN,
                                                        tags=["bench"])))
            for i in range(events)]


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


async def _wait_ready(session: aiohttp.ClientSession, base: str, child: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            async with session.get(f"{base}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the daemon did not become ready")
        await asyncio.sleep(0.1)


async def _send(session: aiohttp.ClientSession, url: str, bodies: list[bytes], rate: float,
                connections: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    answers: Counter[str] = Counter()
    slots = asyncio.Semaphore(connections)
    last_answer = 0.0

    async def one(due: float, body: bytes) -> None:
        nonlocal last_answer
        async with slots:
            try:
                async with session.post(url, data=body,
                                        headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    answers[str(response.status)] += 1
            except (aiohttp.ClientError, TimeoutError):
                answers["error"] += 1
        last_answer = loop.time()
        latencies.append(last_answer - due)

    started = loop.time()
    tasks = []
    for i, body in enumerate(bodies):
        due = started + i / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        tasks.append(asyncio.create_task(one(due, body)))
    await asyncio.gather(*tasks)
    seconds = last_answer - started
    return {"seconds": round(seconds, 3), "achieved_per_s": round(len(bodies) / seconds) if seconds else 0,
            "answers": dict(answers), "latency_ms": {
                "p50": round(1000 * _percentile(latencies, 0.50), 1),
                "p99": round(1000 * _percentile(latencies, 0.99), 1),
                "max": round(1000 * max(latencies, default=0.0), 1)}}


def _stop(child: subprocess.Popen[bytes]) -> dict[str, float]:
    child.send_signal(signal.SIGTERM)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "exit_code": child.returncode}


async def run_benchmark(*, events: int, rate: float, connections: int = 100,
                        database_url: str | None = None) -> dict[str, Any]:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    async with scratch_database("mailgun_sync_hooks", database_url) as url, \
            open_pool(url, max_size=1) as pool, \
            MailgunEmulator(api_key=API_KEY, domains=[DOMAIN]) as emulator:
        await migrate(pool)
        server_version = await pool.fetchval(queries()["server_version"])
        env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
               "MAILGUN_DOMAINS": DOMAIN, "DATABASE_URL": url, "HTTP_PORT": str(port),
               "MAILGUN_WEBHOOK_SIGNING_KEY": SIGNING_KEY, "SYNC_INTERVAL": "604800", "SYNC_JITTER": "0"}
        with tempfile.TemporaryFile() as err:
            argv = [sys.executable, "-m", "worker", "--log-level", "WARNING", "daemon"]
            child = await asyncio.to_thread(subprocess.Popen, argv, env=env, stdout=subprocess.DEVNULL,
                                            stderr=err)
            try:
                # Built after the daemon's fork, whose peak RSS would otherwise count them.
                bodies = payloads(events)
                connector = aiohttp.TCPConnector(limit=connections)
                async with aiohttp.ClientSession(connector=connector) as session:
                    await _wait_ready(session, base, child)
                    await asyncio.sleep(1.0)  # the first scheduled reconciles (empty lists) are done
                    sent = await _send(session, f"{base}/webhooks/mailgun", bodies, rate, connections)
            finally:
                daemon = await asyncio.to_thread(_stop, child) if child.returncode is None else {}
            if daemon.get("exit_code"):
                err.seek(0)
                raise RuntimeError(f"the daemon failed: {err.read().decode()[-500:]}")
        stored = await pool.fetchval(queries()["bench_webhook_rows"])
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "postgresql": server_version, "system": platform.platform()},
        "events": events, "rate": rate, "connections": connections, **sent, "daemon": daemon,
        "rows": stored, "ok": sent["answers"] == {"200": events} and stored == events,
    }


def render(report: dict[str, Any]) -> str:
    latency = report["latency_ms"]
    daemon = report["daemon"]
    answers = ", ".join(f"{n} x {status}" for status, n in sorted(report["answers"].items()))
    return "\n".join([
        f"{report['events']:,} signed webhooks at {report['rate']:g}/s over at most "
        f"{report['connections']} connections; {report['machine']['cpus']} cores, "
        f"PostgreSQL {report['machine']['postgresql']}, Python {report['machine']['python']}",
        f"absorbed {report['achieved_per_s']:,}/s ({report['seconds']:.2f} s); latency p50 "
        f"{latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms, max {latency['max']:.1f} ms",
        f"answers: {answers}; rows in the mirror: {report['rows']:,}",
        f"daemon: {daemon.get('cpu_s', 0):.2f} s CPU, peak RSS {daemon.get('peak_rss_mb', 0):.1f} MB",
        "ok" if report["ok"] else "NOT OK: some webhooks were not answered 200 or not stored",
    ]) + "\n"
