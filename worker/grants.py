"""Least privilege: the statements of sql/roles.sql for given role names, printed or applied."""

from __future__ import annotations

import functools
import re

import asyncpg

from worker.errors import ConfigError
from worker.sql import parse_queries, sql_dir

# Quoted, such a name is also safe inside the string literals and dollar quotes of sql/roles.sql.
_ROLE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,62}")


@functools.cache
def _sections() -> dict[str, str]:
    return parse_queries((sql_dir() / "roles.sql").read_text(encoding="utf-8"))


def role_identifier(name: str, flag: str) -> str:
    """A role name as a quoted identifier (so its case is kept), or ConfigError naming the flag."""
    if not _ROLE.fullmatch(name):
        raise ConfigError(flag, f"{name!r} is not a role name of letters, digits and _ . @ - "
                                "(at most 63), as PostgreSQL stores it")
    return f'"{name}"'


def grant_statements(app_role: str, worker_role: str | None = None) -> str:
    """The application role's grants; with `worker_role`, preceded by the administrator's setup
    (the worker's role owns schema `mailgun`). One script, without a transaction around it."""
    app = role_identifier(app_role, "--app-role")
    sections = [_sections()["app_grants"]]
    if worker_role is not None:
        worker = role_identifier(worker_role, "--worker-role")
        if worker == app:
            raise ConfigError("--app-role", "must not be the worker's role, which owns the schema")
        sections.insert(0, _sections()["setup"].replace("{worker_role}", worker))
    return "\n\n".join(section.replace("{app_role}", app) for section in sections) + "\n"


async def apply_app_grants(connection: asyncpg.Connection, app_role: str) -> None:
    """Grant the application's role exactly what sql/roles.sql says, in the caller's transaction."""
    await connection.execute(grant_statements(app_role))
