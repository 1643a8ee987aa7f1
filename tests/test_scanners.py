"""The security scanners CI runs: bandit keeps the worker's code clean, and the dependency audit
never passes without having audited every pin."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bandit_finds_nothing_of_medium_severity_or_above_in_the_worker() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bandit", "-r", "worker", "--severity-level", "medium", "--format", "json",
         "--quiet"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)
    report = json.loads(done.stdout)
    findings = [f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}"
                for r in report["results"]]
    assert findings == []
    assert done.returncode == 0, done.stderr
    assert report["errors"] == []


def _audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_audit", ROOT / ".ci" / "audit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# pip-audit's JSON report, in the shapes it writes for an audited and for a skipped dependency.
CLEAN = {"name": "aiohttp", "version": "3.14.5", "vulns": []}
VULNERABLE = {"name": "pycrypto", "version": "2.6.1",
              "vulns": [{"id": "PYSEC-2017-94", "fix_versions": [], "aliases": ["CVE-2013-7459"]}]}
SKIPPED = {"name": "yarl",
           "skip_reason": "Dependency not found on PyPI and could not be audited: yarl (1.25.1)"}


def test_the_audit_passes_only_when_every_pin_was_audited_and_none_is_vulnerable() -> None:
    audit = _audit()
    assert audit.classify({"dependencies": [CLEAN], "fixes": []})[0] == audit.EXIT_OK


def test_a_known_vulnerability_fails_the_audit_naming_the_release_and_advisory() -> None:
    audit = _audit()
    code, lines = audit.classify({"dependencies": [CLEAN, VULNERABLE, SKIPPED], "fixes": []})
    assert code == audit.EXIT_VULNERABLE
    assert "pycrypto 2.6.1: PYSEC-2017-94 (fixed in -)" in lines


def test_a_pin_whose_vulnerability_data_could_not_be_read_is_unreachable_not_a_pass() -> None:
    # pip-audit itself reports "No known vulnerabilities found" and exits 0 here.
    audit = _audit()
    code, lines = audit.classify({"dependencies": [CLEAN, SKIPPED], "fixes": []})
    assert code == audit.EXIT_UNREACHABLE
    assert lines[0] == "vulnerability data unreachable: 1 of 2 pins not audited"


def test_an_empty_report_is_no_pass() -> None:
    audit = _audit()
    assert audit.classify({"dependencies": [], "fixes": []})[0] == audit.EXIT_VULNERABLE
