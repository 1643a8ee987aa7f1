"""Daemon replicas as child processes, and what the run log says of their runs."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from datetime import datetime


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
