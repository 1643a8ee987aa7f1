"""Daemon replicas as child processes, and what the run log says of their runs."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp

from tests.support.account import API_KEY
from worker.devtools.benchmark.run import _free_port
from worker.emulator import Fault, MailgunEmulator

try:  # a replica whose clock is off: LD_PRELOAD of libfaketime (a test dependency)
    import libfaketime
    FAKETIME: Path | None = Path(libfaketime.__file__).parent / "vendor/libfaketime/src/libfaketime.so.1"
except ImportError:
    FAKETIME = None


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    http: str


async def run_starts(pool, since: datetime) -> dict[tuple[str, str], list[datetime]]:
    """When each list's recorded runs began, from `since` on, in order."""
    starts: dict[tuple[str, str], list[datetime]] = collections.defaultdict(list)
    for row in await pool.fetch("SELECT domain, list, started_at FROM mailgun.sync_runs "
                                "WHERE started_at >= $1 ORDER BY started_at", since):
        starts[(row["domain"], row["list"])].append(row["started_at"])
    return starts


class Fleet:
    """Daemon replicas on one database, started one by one, each ready before the next."""

    def __init__(self, emulator: MailgunEmulator, database_url: str, *, domains: Sequence[str],
                 interval: float) -> None:
        self._env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
                     "MAILGUN_DOMAINS": ",".join(domains), "DATABASE_URL": database_url,
                     "SYNC_INTERVAL": str(interval), "SYNC_JITTER": "1"}
        self.replicas: list[Replica] = []

    async def start(self, *, clock_offset_s: int | None = None, stderr_to: Path | None = None,
                    **env: str) -> Replica:
        """A replica with these settings over the fleet's, its clock `clock_offset_s` seconds off
        (its monotonic clock left alone), its stderr appended to `stderr_to`."""
        port = _free_port()
        extra = dict(env)
        if clock_offset_s is not None:
            assert FAKETIME is not None, "pip install libfaketime"
            extra.update(LD_PRELOAD=str(FAKETIME), FAKETIME=f"{clock_offset_s:+d}", DONT_FAKE_MONOTONIC="1")
        stderr = stderr_to.open("ab") if stderr_to else asyncio.subprocess.DEVNULL
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "daemon", env={**self._env, "HTTP_PORT": str(port), **extra},
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
        if stderr is not asyncio.subprocess.DEVNULL:
            stderr.close()
        replica = Replica(process, f"http://127.0.0.1:{port}")
        self.replicas.append(replica)
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{replica.http}/readyz") as response:
                        if response.status == 200:
                            return replica
                await asyncio.sleep(0.1)
        raise AssertionError("the replica did not become ready")

    async def stop(self) -> list[int]:
        """SIGTERM to each replica still running; their exit codes."""
        alive = [r.process for r in self.replicas if r.process.returncode is None]
        for process in alive:
            process.send_signal(signal.SIGTERM)
        return [await asyncio.wait_for(process.wait(), 30) for process in alive]


@contextlib.asynccontextmanager
async def fleet(emulator: MailgunEmulator, database_url: str, *, domains: Sequence[str],
                interval: float) -> AsyncIterator[Fleet]:
    """Replicas stopped with SIGTERM at the end; each must exit 0 (a killed one excepted)."""
    started = Fleet(emulator, database_url, domains=domains, interval=interval)
    try:
        yield started
    finally:
        assert set(await started.stop()) <= {0}


@contextlib.asynccontextmanager
async def slow_emulator(domains: Sequence[str]) -> AsyncIterator[MailgunEmulator]:
    """An emulator of these domains that takes 0.3 s to answer each page, so that runs are in
    progress whenever something happens."""
    async with MailgunEmulator(api_key=API_KEY, domains=list(domains)) as running:
        running.inject(Fault(action="delay", delay_s=0.3, times=None, method="GET"))
        yield running

