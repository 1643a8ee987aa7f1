"""`mailgun-sync daemon` as a child process against the emulator and a real PostgreSQL: started,
waited for until it answers, and stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

from tests.support.account import API_KEY, DOMAIN
from tests.support.webhooks import SIGNING_KEY
from worker.devtools.benchmark.run import _free_port
from worker.emulator import MailgunEmulator
from worker.records import SuppressionList

# daemon()'s domains: 3 domains of 4 lists, 12 runs at once, more than the runs' connections.
DOMAINS = ("mg.example.com", "mg.example.org", "mg.example.net")


async def start_daemon(emulator: MailgunEmulator, database_url: str,
                       **extra: str) -> tuple[asyncio.subprocess.Process, str]:
    """`mailgun-sync daemon` for DOMAIN, once its /healthz answers; returns the process and its
    base URL. The caller stops it."""
    port = _free_port()
    env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
           "MAILGUN_DOMAINS": DOMAIN, "DATABASE_URL": database_url, "HTTP_PORT": str(port),
           "SYNC_INTERVAL": "3600", "SYNC_JITTER": "0", **extra}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "daemon", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(f"{base}/healthz") as response:
                    if response.status == 200:
                        return process, base
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    process.kill()
    raise AssertionError("the daemon did not start")


async def stop(process: asyncio.subprocess.Process) -> int:
    process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), 30)


@dataclass
class Running:
    process: asyncio.subprocess.Process
    http: str  # HTTP_PORT's base URL
    webhooks: str  # where the webhooks are served


@contextlib.asynccontextmanager
async def daemon(emulator: MailgunEmulator, database_url: str, session: aiohttp.ClientSession,
                 *, stderr: Path | None = None, open_files: int | None = None,
                 **extra: str) -> AsyncIterator[Running]:
    """`mailgun-sync daemon` for every list of DOMAINS, its first runs started at once; stopped
    with SIGTERM afterwards, and it must exit 0. `stderr`: a file for its log lines; `open_files`:
    the soft limit of open files it is started with (a container's is often 1,024), the hard one
    left as it is."""
    http_port = _free_port()
    env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
           "MAILGUN_DOMAINS": ",".join(DOMAINS), "DATABASE_URL": database_url,
           "HTTP_PORT": str(http_port), "MAILGUN_WEBHOOK_SIGNING_KEY": SIGNING_KEY,
           "SYNC_INTERVAL": "3600", "SYNC_JITTER": "0", "SHUTDOWN_GRACE": "1", **extra}

    def limit() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    with contextlib.ExitStack() as files:
        err = files.enter_context(stderr.open("wb")) if stderr is not None else asyncio.subprocess.DEVNULL
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "daemon", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=err, preexec_fn=limit)
    http = f"http://127.0.0.1:{http_port}"
    webhooks = f"http://127.0.0.1:{extra['WEBHOOK_PORT']}" if "WEBHOOK_PORT" in extra else http
    try:
        for _ in range(300):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{http}/healthz") as response:
                    if response.status == 200:
                        break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the daemon did not start")
        yield Running(process, http, webhooks)
    finally:
        emulator.faults.clear()
        emulator.release()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError("the daemon was still running 30 s after SIGTERM (killed)") from None
        assert code == 0


async def timed_get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, float]:
    started = time.monotonic()
    async with session.get(url) as response:
        return response.status, await response.text(), time.monotonic() - started


async def until_ready(session: aiohttp.ClientSession, running: Running) -> None:
    for _ in range(300):
        if (await timed_get(session, f"{running.http}/readyz"))[0] == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the daemon did not become ready")


async def first_runs_over(pool: asyncpg.Pool) -> None:
    """Every list's first run has ended: none of them holds a connection the proxy cuts."""
    lists = len(DOMAINS) * len(SuppressionList)
    for _ in range(300):
        if await pool.fetchval("SELECT count(*) FROM mailgun.sync_runs") >= lists:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the first runs did not end")
