"""Audit the pinned constraints.txt for known vulnerabilities with pip-audit.

pip-audit asks the package index's vulnerability data about each pinned release. Where that data
cannot be read (no network, or an index that does not serve it), pip-audit skips the release and,
without --strict, reports "No known vulnerabilities found": a silent pass. This script tells the
cases apart instead:

    exit 0  every pin was audited and none has a known vulnerability
    exit 1  a pin has a known vulnerability, or pip-audit failed for another reason
    exit 3  the vulnerability data was unreachable: some or all pins were not audited

--warn-if-unreachable turns exit 3 into a loud warning and exit 0 (CI on a machine that cannot
reach the data); without it an unaudited pin fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_VULNERABLE, EXIT_UNREACHABLE = 0, 1, 3
# The failures of requests (pip-audit's HTTP client) that mean the data could not be reached.
UNREACHABLE_ERRORS = ("ConnectionError", "ProxyError", "SSLError", "Timeout", "ConnectTimeout",
                      "ReadTimeout", "NameResolutionError", "MaxRetryError")


def banner(lines: list[str]) -> str:
    rule = "!" * 78
    return "\n".join([rule, *(f"!! {line}" for line in lines), rule]) + "\n"


def classify(report: dict[str, object]) -> tuple[int, list[str]]:
    """The exit code and the lines to print for pip-audit's JSON report."""
    dependencies = report.get("dependencies")
    if not isinstance(dependencies, list) or not dependencies:
        return EXIT_VULNERABLE, ["pip-audit's report lists no dependency: nothing was audited"]
    vulnerable = [d for d in dependencies if d.get("vulns")]
    skipped = [d for d in dependencies if d.get("skip_reason")]
    lines = [f"{d['name']} {d['version']}: {v['id']} (fixed in {', '.join(v.get('fix_versions') or ['-'])})"
             for d in vulnerable for v in d["vulns"]]
    if vulnerable:
        return EXIT_VULNERABLE, [f"known vulnerabilities in {len(vulnerable)} pinned releases:", *lines]
    if skipped:
        return EXIT_UNREACHABLE, [
            f"vulnerability data unreachable: {len(skipped)} of {len(dependencies)} pins not audited",
            f"first: {skipped[0]['skip_reason']}",
        ]
    return EXIT_OK, [f"no known vulnerabilities in the {len(dependencies)} pins of constraints.txt"]


def audit(requirements: Path) -> tuple[int, list[str]]:
    with tempfile.TemporaryDirectory(prefix="audit-") as scratch:
        report_path = Path(scratch) / "report.json"
        command = [sys.executable, "-m", "pip_audit", "-r", str(requirements), "--no-deps",
                   "--disable-pip", "--progress-spinner", "off", "--format", "json",
                   "--output", str(report_path)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if report_path.exists() and report_path.stat().st_size:
            return classify(json.loads(report_path.read_text(encoding="utf-8")))
    tail = [line for line in done.stderr.splitlines() if line.strip()][-3:] or ["(no output)"]
    if any(name in tail[-1] for name in UNREACHABLE_ERRORS):
        return EXIT_UNREACHABLE, ["vulnerability data unreachable: pip-audit could not reach it", tail[-1]]
    return EXIT_VULNERABLE, [f"pip-audit failed (exit {done.returncode}) before writing its report", *tail]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--warn-if-unreachable", action="store_true",
                        help="exit 0 with a loud warning when the vulnerability data cannot be reached")
    parser.add_argument("-r", "--requirements", type=Path, default=ROOT / "constraints.txt")
    args = parser.parse_args()
    code, lines = audit(args.requirements)
    if code == EXIT_OK:
        print(f"pip-audit: {lines[0]}")
    elif code == EXIT_UNREACHABLE and args.warn_if_unreachable:
        sys.stdout.write(banner(["WARNING: the pinned dependencies were NOT audited for vulnerabilities",
                                 *lines, "run `python .ci/audit.py` where the index's vulnerability "
                                 "data can be reached"]))
        return EXIT_OK
    else:
        sys.stdout.write(banner([f"pip-audit FAILED (exit {code})", *lines]))
    return code


if __name__ == "__main__":
    sys.exit(main())
