"""The webhook benchmark: `mailgun-sync daemon` as a child process on a throwaway database takes N
signed webhooks (bounces, complaints and unsubscribes of distinct addresses, all written) sent at
a target rate over at most C connections.

Each request's latency counts from the moment it was due to be sent, so a server that falls
behind shows it in the latency instead of slowing the sender down. The daemon's own CPU time
comes from os.wait4; every answered event is then looked for in the mirror.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from worker.database import POOL_SIZE, open_pool
from worker.devtools.benchmark.run import API_KEY, DOMAIN, Emulator, _free_port
from worker.devtools.scratch import scratch_database
from worker.devtools.sql import queries
from worker.mailgun import DEFAULT_PAGE_LIMIT
from worker.migrate import migrate
from worker.records import SYNCED_LISTS
from worker.webhooks.selftest import event_data, signed

SIGNING_KEY = "bench-webhook-signing-key"
KINDS = ("failed", "complained", "unsubscribed")


def payloads(events: int, prefix: str = "hook", domain: str = DOMAIN) -> list[bytes]:
    """Signed deliveries, built before the clock starts."""
    return [orjson.dumps(signed(SIGNING_KEY, event_data(KINDS[i % 3], f"{prefix}{i:08}@example.com", domain,
                                                        tags=["bench"])))
            for i in range(events)]


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


async def _wait_ready(session: aiohttp.ClientSession, base: str, child: subprocess.Popen[bytes],
                      probe: str = "/readyz") -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            async with session.get(f"{base}{probe}") as response:
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
    # The peak of the daemon's own memory (VmHWM): the ru_maxrss of wait4 also counts the memory
    # of the benchmark's process at the fork, which grows from one daemon to the next.
    status_text = Path(f"/proc/{child.pid}/status").read_text()
    peak_kb = next(int(line.split()[1]) for line in status_text.splitlines() if line.startswith("VmHWM:"))
    child.send_signal(signal.SIGTERM)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(peak_kb / 1024, 1), "exit_code": child.returncode}


def slow_domains(runs: int) -> tuple[str, ...]:
    """Domains enough for `runs` lists, four lists each, DOMAIN first."""
    return (DOMAIN, *(f"mg{n}.bench.example" for n in range(1, -(-runs // len(SYNCED_LISTS)))))


async def _slow_lists(emulator: Emulator, domains: tuple[str, ...], page_delay: float,
                      seconds: float) -> int:
    """Every list of `domains` long enough, at `page_delay` seconds a page, to be pulled for
    longer than `seconds`; returns the pages a pull takes."""
    pages = math.ceil(seconds / page_delay) + 2
    for domain in domains:
        for kind in SYNCED_LISTS:
            await emulator.generate(domain, kind.value, pages * DEFAULT_PAGE_LIMIT)
    await emulator.fault({"action": "delay", "delay_s": page_delay, "times": None, "method": "GET"})
    return pages


async def _phase(url: str, emulator: Emulator, domains: tuple[str, ...], *, name: str, events: int,
                 rate: float, connections: int, slow_runs: int = 0, flood: float = 0.0) -> dict[str, Any]:
    """One daemon, from its start to its stop, taking a burst of `events` webhooks; with
    `slow_runs` lists being pulled all along, or with `flood` badly signed requests a second."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": emulator.base_url,
           "MAILGUN_DOMAINS": ",".join(domains), "DATABASE_URL": url, "HTTP_PORT": str(port),
           "MAILGUN_WEBHOOK_SIGNING_KEY": SIGNING_KEY, "SYNC_INTERVAL": "604800", "SYNC_JITTER": "0",
           "MAILGUN_TIMEOUT": "600", "SHUTDOWN_GRACE": "0"}
    gets_before = await emulator.served_gets()
    flooder: asyncio.subprocess.Process | None = None
    flooded: dict[str, Any] = {}
    with tempfile.TemporaryFile() as err:
        argv = [sys.executable, "-m", "worker", "--log-level", "WARNING", "daemon"]
        child = await asyncio.to_thread(subprocess.Popen, argv, env=env, stdout=subprocess.DEVNULL,
                                        stderr=err)
        try:
            bodies = payloads(events, prefix=f"{name}-")
            connector = aiohttp.TCPConnector(limit=connections)
            async with aiohttp.ClientSession(connector=connector) as session:
                if slow_runs:
                    # Alive and its runs pulling: the burst starts while they hold their
                    # connections (/readyz is timed at the end, with them still pulling).
                    await _wait_ready(session, base, child, probe="/healthz")
                    await _until_pulling(emulator, gets_before, min(slow_runs, POOL_SIZE))
                else:
                    await _wait_ready(session, base, child)
                    await asyncio.sleep(1.0)  # the first scheduled reconciles (empty lists) are done
                if flood:
                    flooder = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "worker.devtools.benchmark.flood", f"{base}/webhooks/mailgun",
                        str(flood), DOMAIN, stdout=asyncio.subprocess.PIPE)
                    await asyncio.sleep(1.0)  # the flood is under way before the burst starts
                sent = await _send(session, f"{base}/webhooks/mailgun", bodies, rate, connections)
                if flooder is not None:
                    flooder.send_signal(signal.SIGTERM)
                    out, _ = await flooder.communicate()
                    flooded = orjson.loads(out)
                ready = await _probe(session, base)
        finally:
            if flooder is not None and flooder.returncode is None:
                flooder.kill()
                await flooder.wait()
            daemon = await asyncio.to_thread(_stop, child) if child.returncode is None else {}
        if daemon.get("exit_code"):
            err.seek(0)
            raise RuntimeError(f"the daemon failed: {err.read().decode()[-500:]}")
    result: dict[str, Any] = {**sent, "readyz_ms": ready, "daemon": daemon}
    if slow_runs:
        result["runs"] = len(domains) * len(SYNCED_LISTS)
        result["pulling_at_once"] = min(result["runs"], POOL_SIZE)
    if flood:
        result["flood"] = flooded
    return result


async def _until_pulling(emulator: Emulator, gets_before: int, runs: int) -> None:
    """Until `runs` pulls have asked for their first page (answered only a page delay later).
    Runs past the pool's size wait for a connection, so no more than that many pull at once."""
    for _ in range(600):
        if await emulator.served_gets() - gets_before >= runs:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"fewer than {runs} runs started pulling")


async def _probe(session: aiohttp.ClientSession, base: str) -> float:
    """How long /readyz takes to answer 200, in milliseconds."""
    clock = time.perf_counter()
    async with session.get(f"{base}/readyz") as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"/readyz answered {response.status}")
    return round(1000 * (time.perf_counter() - clock), 1)


async def run_benchmark(*, events: int, rate: float, connections: int = 100,
                        database_url: str | None = None, slow_runs: int = 0, page_delay: float = 4.0,
                        flood: float = 0.0) -> dict[str, Any]:
    """The burst alone; then, if asked, while `slow_runs` lists are being pulled at `page_delay`
    seconds a page, and alongside `flood` badly signed requests a second. Each with a daemon of
    its own."""
    domains = slow_domains(slow_runs) if slow_runs else (DOMAIN,)
    phases = ["alone"] + ["flood"] * bool(flood) + ["slow_runs"] * bool(slow_runs)  # in this order
    async with scratch_database("mailgun_sync_hooks", database_url) as url, \
            open_pool(url, max_size=1) as pool, Emulator(0, 0.0, domains) as emulator:
        await migrate(pool)
        server_version = await pool.fetchval(queries()["server_version"])
        report: dict[str, Any] = await _phase(url, emulator, domains, name="alone", events=events, rate=rate,
                                              connections=connections)
        if flood:
            report["flood"] = await _phase(url, emulator, domains, name="flood", events=events, rate=rate,
                                           connections=connections, flood=flood)
        if slow_runs:  # last: the lists it fills would be pulled by a later phase's daemon
            # Pulled for longer than the daemon's start, the burst and its stop take.
            pages = await _slow_lists(emulator, domains, page_delay, events / rate + 15)
            # Each list is due again at once for this phase's daemon: the schedule the earlier
            # daemons shared has them due a week later.
            await pool.execute(queries()["bench_lists_due_now"])
            report["slow_runs"] = {
                "page_delay_s": page_delay, "pages_per_list": pages,
                **await _phase(url, emulator, domains, name="slow_runs", events=events, rate=rate,
                               connections=connections, slow_runs=slow_runs)}
        stored = await pool.fetchval(queries()["bench_webhook_rows"], [f"{name}-%" for name in phases])
    answered = all(report.get(phase, report)["answers"] == {"200": events} for phase in phases)
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "postgresql": server_version, "system": platform.platform()},
        "events": events, "rate": rate, "connections": connections, **report,
        "rows": stored, "ok": answered and stored == events * len(phases),
    }


def _phase_lines(title: str, phase: dict[str, Any]) -> list[str]:
    latency = phase["latency_ms"]
    daemon = phase["daemon"]
    answers = ", ".join(f"{n} x {status}" for status, n in sorted(phase["answers"].items()))
    return [
        f"{title}: absorbed {phase['achieved_per_s']:,}/s ({phase['seconds']:.2f} s); latency p50 "
        f"{latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms, max {latency['max']:.1f} ms; "
        f"/readyz {phase['readyz_ms']:.1f} ms",
        f"  answers: {answers}; daemon: {daemon.get('cpu_s', 0):.2f} s CPU, peak RSS "
        f"{daemon.get('peak_rss_mb', 0):.1f} MB",
    ]


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['events']:,} signed webhooks at {report['rate']:g}/s over at most "
        f"{report['connections']} connections; {report['machine']['cpus']} cores, "
        f"PostgreSQL {report['machine']['postgresql']}, Python {report['machine']['python']}",
        *_phase_lines("alone", report),
    ]
    if "flood" in report:
        flood = report["flood"]["flood"]
        flooded = ", ".join(f"{n} x {status}" for status, n in sorted(flood["answers"].items()))
        lines += _phase_lines(f"with {flood['achieved_per_s']:,} badly signed requests/s", report["flood"])
        lines.append(f"  flood answers: {flooded}")
    if "slow_runs" in report:
        slow = report["slow_runs"]
        lines += _phase_lines(
            f"while {slow['runs']} lists are pulled ({slow['pulling_at_once']} at once, "
            f"{slow['page_delay_s']:g} s a page)", slow)
    lines += [f"rows in the mirror: {report['rows']:,}",
              "ok" if report["ok"] else "NOT OK: some webhooks were not answered 200 or not stored"]
    return "\n".join(lines) + "\n"
