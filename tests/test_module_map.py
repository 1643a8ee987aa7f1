"""The README's module map ("How it is built") names every module and package of `worker/` and
every file of `sql/`, each with its job, and names nothing that is not there.

The map is an indented tree: a line whose first word ends in `/`, `.py` or `.sql` names an entry
of the nearest directory above it indented less; the rest of the line is its job, and a line of
another kind continues the job above. A directory that names none of its entries covers them all;
one that names some must name each module and package in it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## How it is built"
ENTRY = re.compile(r"^(?P<indent> *)(?P<name>\S+(?:/|\.py|\.sql))(?:\s+(?P<job>\S.*))?$")
NOT_A_MODULE = {"__init__.py", "__main__.py"}


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the repository, a directory ending in "/"
    job: str
    line: int


def module_map(readme: str) -> list[str]:
    """The lines of the first code block after the section's heading."""
    lines = readme.splitlines()
    try:
        heading = lines.index(SECTION)
        opening = next(i for i in range(heading + 1, len(lines)) if lines[i].startswith("```"))
        closing = next(i for i in range(opening + 1, len(lines)) if lines[i].startswith("```"))
    except (ValueError, StopIteration):
        raise AssertionError(f"README.md has no code block under {SECTION!r}") from None
    return lines[opening + 1:closing]


def parse(lines: list[str]) -> list[Entry]:
    entries: list[Entry] = []
    parents: list[tuple[int, str]] = []  # (indent, directory path) of the directories above
    for number, line in enumerate(lines, start=1):
        match = ENTRY.match(line)
        if match is None:
            continue  # blank, or the job of the entry above continued
        indent = len(match["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = (parents[-1][1] if parents else "") + match["name"]
        entries.append(Entry(path, match["job"] or "", number))
        if path.endswith("/"):
            parents.append((indent, path))
    return entries


def tree() -> set[str]:
    """What the map must account for: worker's modules and packages, and sql's files."""
    found: set[str] = set()
    for path in (ROOT / "worker").rglob("*"):
        if "__pycache__" in path.parts:
            continue
        if path.is_dir() and (path / "__init__.py").is_file():
            found.add(f"{path.relative_to(ROOT).as_posix()}/")
        elif path.suffix == ".py" and path.name not in NOT_A_MODULE:
            found.add(path.relative_to(ROOT).as_posix())
    for path in (ROOT / "sql").rglob("*"):
        found.add(path.relative_to(ROOT).as_posix() + ("/" if path.is_dir() else ""))
    return found


def parent_of(path: str) -> str:
    return path.rstrip("/").rpartition("/")[0] + "/"


def covered(path: str, named: set[str]) -> bool:
    """Named itself, or inside a named directory that names none of its entries."""
    if path in named:
        return True
    directory = parent_of(path)
    while directory != "/":
        if directory in named:
            return not any(parent_of(other) == directory for other in named)
        directory = parent_of(directory)
    return False


def exists(path: str) -> bool:
    return (ROOT / path).is_dir() if path.endswith("/") else (ROOT / path).is_file()


def test_the_readmes_module_map_names_every_module_and_sql_file_with_its_job_and_nothing_stale():
    entries = parse(module_map((ROOT / "README.md").read_text(encoding="utf-8")))
    named = {entry.path for entry in entries}
    missing = sorted(path for path in tree() if not covered(path, named))
    stale = sorted(entry.path for entry in entries if not exists(entry.path))
    jobless = sorted(entry.path for entry in entries if not entry.job)
    problems = [
        *(f"missing (add a line with its job): {path}" for path in missing),
        *(f"stale (no such file or package): {path}" for path in stale),
        *(f"named without its job: {path}" for path in jobless),
    ]
    assert not problems, f"README.md's module map ({SECTION!r}) is out of step with the tree:\n  " \
        + "\n  ".join(problems)


def test_the_module_map_reads_nesting_from_indentation_and_a_partial_listing_as_incomplete():
    entries = parse([
        "worker/",
        "  cli.py        commands",
        "  mailgun/      talking to Mailgun",
        "    client.py   the client",
        "                (its job continued)",
        "  emulator/     the emulator, named whole",
        "sql/",
        "  migrations/   the schema",
    ])
    named = {entry.path for entry in entries}
    assert named == {"worker/", "worker/cli.py", "worker/mailgun/", "worker/mailgun/client.py",
                     "worker/emulator/", "sql/", "sql/migrations/"}
    assert covered("worker/emulator/app.py", named)  # its package names none of its modules
    assert covered("sql/migrations/0001_create_mirror.sql", named)
    assert not covered("worker/mailgun/paging.py", named)  # its package names some, not this one
    assert not covered("worker/logs.py", named)
