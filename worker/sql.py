"""The project's SQL: named queries from sql/queries.sql and the versioned migrations, read once."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

_NAME = re.compile(r"^-- name: (?P<name>[a-z_]+(?:@[a-z]+)?)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


def sql_dir() -> Path:
    """`sql/` beside the package in a checkout; `worker/_sql` inside an installed wheel."""
    packaged = Path(__file__).resolve().parent / "_sql"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "sql"


def parse_queries(text: str) -> dict[str, str]:
    """Split a file of `-- name: NAME` sections into {name: sql}; a name may appear once."""
    marks = list(_NAME.finditer(text))
    queries: dict[str, str] = {}
    for mark, following in zip(marks, [*marks[1:], None], strict=True):
        end = following.start() if following else len(text)
        body = text[mark.end():end].strip()
        name = mark.group("name")
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        if not body:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = body
    return queries


def named_queries(file_name: str) -> dict[str, str]:
    """The `-- name:` sections of a file in sql/."""
    return parse_queries((sql_dir() / file_name).read_text(encoding="utf-8"))


@functools.cache
def queries() -> dict[str, str]:
    return named_queries("queries.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@functools.cache
def migrations() -> tuple[Migration, ...]:
    found = []
    for path in sorted((sql_dir() / "migrations").glob("*.sql")):
        match = _MIGRATION.match(path.name)
        if match is None:
            raise ValueError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(match["version"]), match["name"], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError("two migrations share a version number")
    return tuple(found)
