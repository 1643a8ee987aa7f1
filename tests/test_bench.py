"""The benchmark keeps working (at a small N: figures come from the command, not from tests)."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

# The benchmarks run as child processes.
pytestmark = pytest.mark.slow


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


def test_bench_prune_reports_the_pruning_and_the_writer_alone_and_meanwhile_as_json():
    done = subprocess.run(
        [sys.executable, "-m", "worker", "--log-level", "WARNING", "bench-prune", "--old", "25000",
         "--fresh", "2000", "--runs", "400", "--baseline-seconds", "0.5", "--json"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["ok"]
    prune = report["prune"]
    assert prune["tables"]["changes"]["rows"] == 25000
    assert prune["tables"]["changes"]["batches"] == 3
    assert 0 < prune["tables"]["sync_runs"]["rows"] < 400
    assert prune["rows_per_s"] > 0 and prune["longest_statement_ms"] > 0
    assert report["left"] == {"old": 0, "fresh": 2000, "written": report["left"]["written"]}
    for phase in ("alone", "while_pruning"):
        writer = report["writer"][phase]
        assert writer["writes"] > 0 and writer["errors"] == 0
        assert writer["latency_ms"]["p99"] >= writer["latency_ms"]["p50"] > 0


def test_bench_with_deletions_deletes_them_at_mailgun():
    done = subprocess.run(
        [sys.executable, "-m", "worker", "--log-level", "WARNING", "bench", "--records", "1500",
         "--deletions", "500", "--json"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert (report["deletions"], report["baseline"]) == (500, None)
    assert report["worker"]["result"]["status"] == "ok"
    assert report["worker"]["result"]["deleted"] == 500
    assert report["worker"]["steps"]["delete"] > 0
