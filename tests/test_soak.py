"""The soak keeps working, at a short length (the 10-minute figures come from the command)."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

# The soak runs as a child process for 10 seconds.
pytestmark = pytest.mark.slow


def test_a_short_soak_converges_with_flat_connections_and_tasks():
    done = subprocess.run(
        [sys.executable, "-m", "worker", "--log-level", "WARNING", "soak", "--seconds", "10",
         "--records", "2000", "--json"],
        capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["converged"] is True
    assert report["daemon_exit_code"] == 0
    assert report["runs"].get("ok", 0) >= 3
    fds, tasks = report["open_fds"], report["asyncio_tasks"]
    assert fds["end"] - fds["after_warm_up"] <= 3
    assert tasks["end"] - tasks["after_warm_up"] <= 2
