"""What one in-process `mailgun-sync` call returned and printed."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from tests.support.account import API_KEY

BASIC_AUTH = base64.b64encode(f"api:{API_KEY}".encode()).decode()


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str

    def report(self) -> dict[str, Any]:
        """stdout as the one JSON object `--json` prints, and nothing else."""
        [line] = self.out.splitlines()
        payload: dict[str, Any] = json.loads(line)
        return payload

    def result(self, domain: str, kind: str) -> dict[str, Any]:
        """One (domain, list) of `run --json`."""
        [found] = [r for r in self.report()["results"] if (r["domain"], r["list"]) == (domain, kind)]
        return found

    def lists(self) -> dict[tuple[str, str], dict[str, Any]]:
        """`status --json`'s lists, by (domain, list)."""
        report = self.report()
        assert set(report) == {"lists", "discovery", "unsynced_pending"}
        return {(entry["domain"], entry["list"]): entry for entry in report["lists"]}

    def logs(self) -> list[dict[str, Any]]:
        """stderr's log lines; each one is a JSON object (stderr is not a terminal here)."""
        return [json.loads(line) for line in self.err.splitlines() if not line.startswith("mailgun-sync:")]

    def assert_no_secret(self, *others: str) -> None:
        for stream in (self.out, self.err):
            for secret in (API_KEY, BASIC_AUTH, *others):
                assert secret not in stream
