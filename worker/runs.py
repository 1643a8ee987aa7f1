"""How a run of one (domain, list) ended, in the words the run table, `--json`, `status`, the
metrics and mailgun.sync_runs all use."""

from __future__ import annotations

import enum


class RunStatus(enum.StrEnum):
    """A run's outcome; the value is what reports, labels and the run log show (README, `run`)."""

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
