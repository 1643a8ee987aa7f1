"""`mailgun-sync` as a child process: what it exits with and prints, for what is about a process
(ports, signals, its streams), where an in-process call would not show it."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

from tests.support.cli import Outcome

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
