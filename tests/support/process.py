"""`mailgun-sync` as a child process: what it exits with and prints, for what is about a process
(ports, signals, its streams), where an in-process call would not show it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import IO, Any

from tests.support.account import API_KEY, DOMAIN
from tests.support.cli import Outcome
from worker.emulator import MailgunEmulator, RecordedRequest

# A command that has not exited by then is killed and the test fails.
DEADLINE_S = 60.0


async def run_worker(*argv: str, env: Mapping[str, str] | None = None,
                     stdout: IO[Any] | int = asyncio.subprocess.PIPE,
                     deadline: float = DEADLINE_S) -> Outcome:
    """Run `python -m worker ARGV` to its end; stderr is a pipe, so logs are JSON lines."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *argv, env=dict(os.environ if env is None else env),
        stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), deadline)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"mailgun-sync {' '.join(argv)} still running after {deadline} s") from None
    assert process.returncode is not None
    return Outcome(process.returncode, (out or b"").decode(), err.decode())


async def run_killed_once(emulator: MailgunEmulator, database_url: str,
                          reached: Callable[[RecordedRequest], bool], *, then: float = 0.0,
                          deadline: float = 20.0) -> None:
    """`mailgun-sync run --list bounces` of DOMAIN as a child process, SIGKILLed `then` seconds after
    Mailgun has seen a request `reached` says it waits for (the request it holds, or has answered)."""
    env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
           "MAILGUN_DOMAINS": DOMAIN, "DATABASE_URL": database_url}
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", "--list", "bounces", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline
    while not any(reached(r) for r in list(emulator.requests)):
        assert loop.time() < until, "the run never got there"
        await asyncio.sleep(0.01)
    await asyncio.sleep(then)
    worker.send_signal(signal.SIGKILL)
    await worker.wait()

