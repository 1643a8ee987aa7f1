"""The benchmark keeps working (at a small N: figures come from the command, not from tests)."""

from __future__ import annotations

import subprocess
import sys

import orjson


def test_bench_reports_worker_and_baseline_figures_as_json():
    done = subprocess.run(
        [sys.executable, "-m", "worker", "--log-level", "WARNING", "bench", "--records", "3000", "--json"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert (report["records"], report["pending"]) == (3000, 30)
    worker, baseline = report["worker"], report["baseline"]
    assert worker["exit_code"] == 0
    assert worker["result"]["status"] == "ok"
    result = worker["result"]
    assert (result["inserted"], result["removed"], result["pushed"]) == (30, 30, 30)
    assert baseline["result"] == {"pulled": 3000, "removed": 30, "pushed": 30}
    for run in (worker, baseline):
        assert run["pages"] >= 4
        assert run["cpu_s"] > 0
        assert run["peak_rss_mb"] > 0
    assert report["speedup"] > 0
    assert {"pull", "diff", "apply", "push"} <= set(worker["steps"])
