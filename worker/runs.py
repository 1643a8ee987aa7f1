"""How a run of one (domain, list) ended and what it did, in the words the run table, `--json`,
`status`, the metrics and mailgun.sync_runs all use."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields


class RunStatus(enum.StrEnum):
    """How a run ended (README, `run`); the value is what the reports, the metrics and the run log show."""

    OK = "ok"
    # Another process holds the list's lock: nothing done, and no run recorded.
    SKIPPED = "skipped"
    FAILED = "failed"
    # It would have removed more than SYNC_MAX_DELETE_FRACTION: removed nothing, applied the rest.
    GUARDED = "guarded"

    @property
    def succeeded(self) -> bool:
        """Whether `run` takes it for success (exit 0)."""
        return self in (RunStatus.OK, RunStatus.SKIPPED)


@dataclass(slots=True, kw_only=True)
class RunCounts:
    """What a run did, in records. In this order the run table's columns, `--json`, `status`, the
    `action` label of mailgun_sync_records and mailgun.sync_runs' columns give them."""

    pulled: int = 0
    inserted: int = 0
    updated: int = 0
    removed: int = 0
    adopted: int = 0
    pushed: int = 0
    rejected: int = 0
    deleted: int = 0
    # Records Mailgun listed that the mirror cannot hold: left out, their mirror rows untouched.
    skipped: int = 0

    def by_name(self) -> dict[str, int]:
        """Every count by its name, in their order."""
        return {name: getattr(self, name) for name in RUN_COUNTS}

    def counts(self) -> tuple[int, ...]:
        """Every count, in their order."""
        return tuple(self.by_name().values())

    def changes(self) -> int:
        """Records changed on either side: every count but those read (pulled) and left out (skipped)."""
        return sum(self.counts()) - self.pulled - self.skipped


# The counts' names, in their order.
RUN_COUNTS = tuple(f.name for f in fields(RunCounts))
