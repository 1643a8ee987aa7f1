"""Waiting, with a deadline, for something another task or process makes true."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_for(condition: Callable[[], object], *, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out waiting")
