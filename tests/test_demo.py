"""The README's "run it" command: the demo needs no key and no database, and shows both sides."""

from __future__ import annotations

import subprocess
import sys

import pytest

# The demo runs as a child process.
pytestmark = pytest.mark.slow


def test_demo_reconciles_both_sides_and_a_third_run_changes_nothing(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "worker", "demo"], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Mailgun emulator: http://127.0.0.1:" in out
    assert "mirror   insert  bounces" in out
    assert "mirror   remove  bounces" in out
    assert "Mailgun  push    unsubscribes  crm.optout@example.org" in out
    assert "mirror   reject  bounces       not-an-address" in out
    assert "A third run finds both sides in step: 0 changes." in out
    assert "Traceback" not in done.stderr
