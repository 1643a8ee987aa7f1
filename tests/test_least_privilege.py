"""Least privilege in PostgreSQL: the worker runs as a role that owns schema `mailgun` and holds no
other right (no superuser, no right to create schemas), and the applications' role can do what the
README says applications do, and nothing else (sql/roles.sql, `mailgun-sync grants`)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.support.account import API_KEY, DOMAIN
from tests.support.webhooks import SIGNING_KEY, deliver, event, webhook_app
from worker.database import open_pool
from worker.devtools.scratch import database_statement, run_admin, with_database
from worker.mailgun import MailgunClient
from worker.migrate import migrate
from worker.records import SuppressionList
from worker.settings import Settings

BOUNCES, UNSUBSCRIBES = SuppressionList.BOUNCES, SuppressionList.UNSUBSCRIBES
CREATED = "Mon, 02 Mar 2026 10:00:00 UTC"
DENIED = "InsufficientPrivilegeError"


@dataclass(frozen=True)
class Roles:
    """A database of its own, in which nobody but its administrator has any right yet."""

    admin_url: str
    worker: str
    worker_url: str
    app: str
    app_url: str


def as_role(url: str, role: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}{port}"))


@pytest.fixture
async def roles(test_database: Any) -> AsyncIterator[Roles]:
    suffix = secrets.token_hex(4)
    worker, app, name = (f"mailgun_sync_worker_{suffix}", f"mailgun_sync_app_{suffix}",
                         f"mailgun_sync_roles_{suffix}")
    password = secrets.token_hex(16)
    admin = await asyncpg.connect(test_database.admin_url)
    try:
        if not await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            pytest.skip("creating roles and handing objects between them needs a superuser")
        for role in (worker, app):  # generated names; a password works whatever the server's auth
            await admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                                f"PASSWORD '{password}'")
        await run_admin(test_database.admin_url, database_statement("create_database", name))
        admin_url = with_database(test_database.admin_url, name)
        # Not even PUBLIC's usual CONNECT and TEMPORARY: the setup must grant what the roles need.
        await run_admin(admin_url, f"REVOKE ALL ON DATABASE {name} FROM PUBLIC")
        yield Roles(admin_url, worker, as_role(admin_url, worker, password),
                    app, as_role(admin_url, app, password))
    finally:
        await run_admin(test_database.admin_url, database_statement("drop_database", name))
        for role in (worker, app):
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(url, statement_cache_size=0)
    try:
        yield connection
    finally:
        await connection.close()


async def set_up(roles: Roles, invoke: Callable[..., Any]) -> None:
    """What the README says to do: the administrator's setup, then `migrate` as the worker."""
    granted = await invoke("grants", "--worker-role", roles.worker, "--app-role", roles.app, "--apply",
                           env={"DATABASE_URL": roles.admin_url})
    assert granted.code == 0, granted.err
    migrated = await invoke("migrate", "--app-role", roles.app, env={"DATABASE_URL": roles.worker_url})
    assert migrated.code == 0, migrated.err


@pytest.fixture
async def least_privileged(roles: Roles, invoke: Callable[..., Any]) -> Roles:
    await set_up(roles, invoke)
    return roles


def worker_env(roles: Roles, emulator: Any) -> dict[str, str]:
    return {"MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
            "MAILGUN_DOMAINS": DOMAIN, "DATABASE_URL": roles.worker_url, "MAILGUN_BACKOFF_MAX": "0.01"}


async def run_ok(invoke: Callable[..., Any], env: dict[str, str]) -> None:
    outcome = await invoke("run", "--json", env=env)
    assert outcome.code == 0, outcome.out + outcome.err
    assert {r["status"] for r in outcome.report()["results"]} == {"ok"}


def addresses(emulator: Any, kind: SuppressionList) -> list[str]:
    return sorted(r["address"] for r in emulator.records(DOMAIN, kind))


# ---- the worker's role -----------------------------------------------------------------------


async def test_the_worker_role_owns_the_schema_and_everything_in_it_and_nothing_more(least_privileged):
    async with connected(least_privileged.worker_url) as worker:
        assert await worker.fetchval(
            "SELECT rolsuper OR rolcreatedb OR rolcreaterole OR rolbypassrls FROM pg_roles "
            "WHERE rolname = current_user") is False
        assert await worker.fetchval("SELECT has_database_privilege(current_database(), 'CREATE')") is False
        assert await worker.fetchval(
            "SELECT nspowner = current_user::regrole FROM pg_namespace WHERE nspname = 'mailgun'")
        assert await objects_not_owned_by(worker, least_privileged.worker) == []


async def objects_not_owned_by(connection: asyncpg.Connection, role: str) -> list[str]:
    found = await connection.fetch(
        """SELECT oid::regclass::text AS name FROM pg_class
           WHERE relnamespace = 'mailgun'::regnamespace AND relowner <> $1::regrole
           UNION ALL
           SELECT oid::regprocedure::text FROM pg_proc
           WHERE pronamespace = 'mailgun'::regnamespace AND proowner <> $1::regrole
           UNION ALL
           SELECT oid::regtype::text FROM pg_type
           WHERE typnamespace = 'mailgun'::regnamespace AND typowner <> $1::regrole""", role)
    return [r["name"] for r in found]


async def test_the_worker_as_that_role_reconciles_backfills_and_reports_status(
        least_privileged, invoke, emulator):
    roles, env = least_privileged, worker_env(least_privileged, emulator)
    emulator.seed(DOMAIN, BOUNCES, [{"address": "at-mailgun@example.com", "created_at": CREATED}])
    async with connected(roles.app_url) as app:
        await app.execute("INSERT INTO mailgun.bounces (domain, address) VALUES ($1, 'local@example.com')",
                          DOMAIN)

    await run_ok(invoke, env)
    assert addresses(emulator, BOUNCES) == ["at-mailgun@example.com", "local@example.com"]

    async with connected(roles.app_url) as app:
        await app.execute("DELETE FROM mailgun.bounces WHERE address_key = 'at-mailgun@example.com'")
    await run_ok(invoke, env)
    assert addresses(emulator, BOUNCES) == ["local@example.com"]

    backfill = await invoke("backfill", env=env)
    assert backfill.code == 0, backfill.out + backfill.err
    status = await invoke("status", "--json", env=env)
    assert status.code == 0, status.err


async def test_the_worker_as_that_role_stores_webhooks(least_privileged, client: MailgunClient, emulator,
                                                       aiohttp_client):
    settings = Settings(api_key=API_KEY, api_base=str(emulator.base_url), domains=(DOMAIN,),
                        webhook_signing_key=SIGNING_KEY)
    async with open_pool(least_privileged.worker_url, max_size=2) as pool, \
            webhook_app(pool, client, settings) as app:
        http = await aiohttp_client(app)
        delivery = event("complained", "hook@example.com", DOMAIN)
        assert await deliver(http, delivery) == (200, "stored")
        assert await deliver(http, delivery) == (200, "replay")
    async with connected(least_privileged.app_url) as app_connection:
        assert await app_connection.fetchval(
            "SELECT sync_state::text FROM mailgun.complaints WHERE address = 'hook@example.com'") == "synced"


async def test_the_worker_as_that_role_prunes(least_privileged, invoke):
    async with connected(least_privileged.worker_url) as worker:
        await worker.execute(
            """INSERT INTO mailgun.changes (run_id, domain, list, address, action, at)
               VALUES (gen_random_uuid(), $1, 'bounces', 'old@example.com', 'insert',
                       now() - interval '40 days')""", DOMAIN)
        pruned = await invoke("prune", "--json", env={"DATABASE_URL": least_privileged.worker_url})
        assert pruned.code == 0, pruned.err
        assert await worker.fetchval("SELECT count(*) FROM mailgun.changes") == 0


# ---- the applications' role ------------------------------------------------------------------


async def test_the_application_role_does_what_the_readme_says_applications_do(
        least_privileged, invoke, emulator):
    roles, env = least_privileged, worker_env(least_privileged, emulator)
    emulator.seed(DOMAIN, BOUNCES, [{"address": "x@example.org", "created_at": CREATED}])
    emulator.seed(DOMAIN, UNSUBSCRIBES, [{"address": "a@b.com", "tags": ["news", "promo"],
                                          "created_at": CREATED}])
    await run_ok(invoke, env)

    async with connected(roles.app_url) as app:
        # Check before sending.
        assert await app.fetchval(
            """SELECT EXISTS (SELECT 1 FROM mailgun.bounces
                              WHERE domain = $1 AND address_key = lower($2 COLLATE "C"))""",
            DOMAIN, "X@example.org")
        # Add suppressions: the README's inserts.
        for statement, values in [
            ("INSERT INTO mailgun.unsubscribes (domain, address, tags) VALUES ($1, $2, $3)",
             ("new@b.com", ["newsletter"])),
            ("INSERT INTO mailgun.bounces (domain, address, code, error) VALUES ($1, $2, $3, $4)",
             ("x@y.com", "550", "no such user")),
            ("INSERT INTO mailgun.complaints (domain, address) VALUES ($1, $2)", ("c@d.com",)),
            ("INSERT INTO mailgun.allowlist (domain, type, value, reason) VALUES ($1, $2, $3, $4)",
             ("domain", "partner.example.org", "our partner")),
            ("INSERT INTO mailgun.bounces (domain, address) VALUES ($1, $2)", ("not an address",)),
        ]:
            await app.execute(statement, DOMAIN, *values)
        # Remove suppressions: a delete and a dropped tag, both queued by the triggers.
        await app.execute("DELETE FROM mailgun.bounces WHERE domain = $1 AND address_key = 'x@example.org'",
                          DOMAIN)
        await app.execute("""UPDATE mailgun.unsubscribes SET tags = array_remove(tags, 'promo')
                             WHERE domain = $1 AND address_key = 'a@b.com'""", DOMAIN)
        # Added and removed again before a run: the removal is cancelled, then queued again.
        await app.execute("INSERT INTO mailgun.bounces (domain, address) VALUES ($1, $2)",
                          DOMAIN, "x@example.org")
        await app.execute("DELETE FROM mailgun.bounces WHERE address_key = 'x@example.org'")

    async with connected(roles.admin_url) as admin:
        queued = await admin.fetch("SELECT list, address, tag FROM mailgun.removals ORDER BY list")
        assert [tuple(r) for r in queued] == [("bounces", "x@example.org", ""),
                                               ("unsubscribes", "a@b.com", "promo")]

    outcome = await invoke("run", "--json", env=env)
    assert outcome.code == 0, outcome.out + outcome.err
    assert addresses(emulator, BOUNCES) == ["x@y.com"]
    assert {r["address"]: r["tags"] for r in emulator.records(DOMAIN, UNSUBSCRIBES)} == {
        "a@b.com": ["news"], "new@b.com": ["newsletter"]}

    async with connected(roles.app_url) as app:
        # Correct a rejected row with an UPDATE: it is pending again.
        assert await app.fetchval(
            "SELECT sync_state::text FROM mailgun.bounces WHERE address = 'not an address'") == "rejected"
        await app.execute("UPDATE mailgun.bounces SET address = 'fixed@example.com' "
                          "WHERE address = 'not an address'")
        assert await app.fetchval(
            "SELECT sync_state::text FROM mailgun.bounces WHERE address = 'fixed@example.com'") == "pending"
        # Read the run records and the change log.
        assert await app.fetchval("SELECT count(*) FROM mailgun.sync_runs") > 0
        deleted = await app.fetch("SELECT list, address FROM mailgun.changes WHERE action = 'delete'")
        assert sorted(tuple(r) for r in deleted) == [("bounces", "x@example.org"),
                                                     ("unsubscribes", "a@b.com")]


# Everything the applications' role must be refused, each statement on its own.
FORBIDDEN = [
    "SELECT * FROM mailgun.webhook_tokens",
    "INSERT INTO mailgun.webhook_tokens (token, signed_at) VALUES ('t', now())",
    "DELETE FROM mailgun.webhook_tokens",
    "SELECT * FROM mailgun.removals",
    "INSERT INTO mailgun.removals (domain, list, address) VALUES ('d', 'bounces', 'a@b.c')",
    "UPDATE mailgun.removals SET done_at = now()",
    "DELETE FROM mailgun.removals",
    "INSERT INTO mailgun.sync_runs (run_id, domain, list, status, started_at, finished_at) "
    "VALUES (gen_random_uuid(), 'd', 'bounces', 'ok', now(), now())",
    "UPDATE mailgun.sync_runs SET status = 'ok'",
    "DELETE FROM mailgun.sync_runs",
    "INSERT INTO mailgun.changes (run_id, domain, list, address, action) "
    "VALUES (gen_random_uuid(), 'd', 'bounces', 'a@b.c', 'insert')",
    "UPDATE mailgun.changes SET detail = 'x'",
    "DELETE FROM mailgun.changes",
    "SELECT * FROM mailgun.backfill_pages",
    "SELECT * FROM mailgun.backfill_progress",
    "SELECT * FROM mailgun.discovered_domains",
    "SELECT * FROM mailgun.schema_migrations",
    "SELECT nextval('mailgun.changes_id_seq')",
    "SELECT nextval('mailgun.removals_id_seq')",
    "TRUNCATE mailgun.bounces",
    # The worker's bookkeeping.
    "INSERT INTO mailgun.bounces (domain, address, sync_state) VALUES ('d', 'a@b.c', 'synced')",
    "INSERT INTO mailgun.bounces (domain, address, sent_at) VALUES ('d', 'a@b.c', now())",
    "UPDATE mailgun.bounces SET sync_state = 'synced'",
    "UPDATE mailgun.unsubscribes SET synced_at = now()",
    "UPDATE mailgun.allowlist SET sync_error = NULL",
    # No DDL.
    "CREATE TABLE mailgun.mine (a int)",
    "CREATE VIEW mailgun.mine AS SELECT 1",
    "CREATE FUNCTION mailgun.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "ALTER TABLE mailgun.bounces ADD COLUMN mine int",
    "ALTER TABLE mailgun.bounces DISABLE TRIGGER bounces_local_removal",
    "CREATE INDEX mine ON mailgun.bounces (error)",
    "DROP TABLE mailgun.bounces",
    "DROP TRIGGER bounces_local_removal ON mailgun.bounces",
    "CREATE TRIGGER mine AFTER INSERT ON mailgun.bounces EXECUTE FUNCTION mailgun.note_local_removal()",
    "CREATE OR REPLACE FUNCTION mailgun.note_local_change() RETURNS trigger LANGUAGE plpgsql "
    "AS 'BEGIN RETURN NEW; END'",
    "ALTER SCHEMA mailgun RENAME TO mine",
    "DROP SCHEMA mailgun CASCADE",
]


async def test_the_application_role_is_refused_everything_else(least_privileged):
    outcomes: dict[str, str] = {}
    async with connected(least_privileged.app_url) as app:
        for statement in FORBIDDEN:
            try:
                async with app.transaction():
                    await app.execute(statement)
                outcomes[statement] = "allowed"
            except asyncpg.PostgresError as exc:
                outcomes[statement] = type(exc).__name__
    assert {s: o for s, o in outcomes.items() if o != DENIED} == {}


# ---- each object decided ---------------------------------------------------------------------

EVERY_COLUMN = "*"
# The applications' role's rights on every table and sequence of the schema: {privilege: columns}.
# A table or sequence a migration adds fails this test until its line here (and sql/roles.sql)
# says what applications may do with it.
APP_RIGHTS: dict[str, dict[str, set[str]]] = {
    "bounces": {"SELECT": {EVERY_COLUMN}, "DELETE": {EVERY_COLUMN},
                "INSERT": {"domain", "address", "code", "error", "created_at"},
                "UPDATE": {"domain", "address", "code", "error", "created_at"}},
    "unsubscribes": {"SELECT": {EVERY_COLUMN}, "DELETE": {EVERY_COLUMN},
                     "INSERT": {"domain", "address", "tags", "created_at"},
                     "UPDATE": {"domain", "address", "tags", "created_at"}},
    "complaints": {"SELECT": {EVERY_COLUMN}, "DELETE": {EVERY_COLUMN},
                   "INSERT": {"domain", "address", "created_at"},
                   "UPDATE": {"domain", "address", "created_at"}},
    "allowlist": {"SELECT": {EVERY_COLUMN}, "DELETE": {EVERY_COLUMN},
                  "INSERT": {"domain", "type", "value", "reason", "created_at"},
                  "UPDATE": {"domain", "type", "value", "reason", "created_at"}},
    "sync_runs": {"SELECT": {EVERY_COLUMN}},
    "changes": {"SELECT": {EVERY_COLUMN}},
    "removals": {},  # written by the lists' triggers, which run as the schema's owner
    "webhook_tokens": {},
    "backfill_pages": {},
    "backfill_progress": {},
    "discovered_domains": {},
    "schedule": {},  # which replica runs which list when: the daemons' business
    "last_runs": {},  # what `status` reads: the run log, sync_runs, is the applications' to read
    "schema_migrations": {},
    "sync_runs_id_seq": {},
    "changes_id_seq": {},
    "removals_id_seq": {},
}


async def test_every_table_and_sequence_has_the_rights_decided_for_applications(least_privileged):
    async with connected(least_privileged.admin_url) as admin:
        relations = await admin.fetch(
            "SELECT relname FROM pg_class WHERE relnamespace = 'mailgun'::regnamespace "
            "AND relkind IN ('r', 'p', 'v', 'm', 'f', 'S')")
        granted = await admin.fetch(
            """SELECT c.relname, a.privilege_type, '*' AS column_name
               FROM pg_class c, aclexplode(c.relacl) a
               WHERE c.relnamespace = 'mailgun'::regnamespace AND a.grantee = $1::regrole
               UNION ALL
               SELECT c.relname, a.privilege_type, att.attname
               FROM pg_class c JOIN pg_attribute att ON att.attrelid = c.oid, aclexplode(att.attacl) a
               WHERE c.relnamespace = 'mailgun'::regnamespace AND a.grantee = $1::regrole""",
            least_privileged.app)
        to_public = await admin.fetch(
            """SELECT c.relname FROM pg_class c, aclexplode(c.relacl) a
               WHERE c.relnamespace = 'mailgun'::regnamespace AND a.grantee = 0""")
        executable = await admin.fetch(
            """SELECT oid::regprocedure::text AS name FROM pg_proc
               WHERE pronamespace = 'mailgun'::regnamespace
                 AND has_function_privilege($1::name, oid, 'EXECUTE')""",
            least_privileged.app)
    actual: dict[str, dict[str, set[str]]] = {r["relname"]: {} for r in relations}
    for row in granted:
        actual[row["relname"]].setdefault(row["privilege_type"], set()).add(row["column_name"])
    assert actual == APP_RIGHTS
    assert to_public == []
    assert executable == []


async def test_trigger_functions_that_touch_removals_run_as_the_owner_with_a_fixed_search_path(pool):
    functions = await pool.fetch(
        """SELECT proname, prosecdef, proconfig, prosrc LIKE '%mailgun.removals%' AS touches_removals
           FROM pg_proc WHERE pronamespace = 'mailgun'::regnamespace ORDER BY proname""")
    definers = {f["proname"] for f in functions if f["prosecdef"]}
    assert definers == {f["proname"] for f in functions if f["touches_removals"]}
    assert definers == {"cancel_local_removal", "guard_identity", "note_held_when_readded",
                        "note_local_removal", "note_tag_removal"}
    assert {f["proname"]: f["proconfig"] for f in functions if f["prosecdef"]} == {
        name: ["search_path=pg_catalog, pg_temp"] for name in definers}


# ---- the command -----------------------------------------------------------------------------


async def test_a_schema_a_superuser_migrated_is_handed_to_the_worker_role_by_the_printed_script(
        roles, invoke, emulator):
    async with open_pool(roles.admin_url, max_size=1) as admin_pool:
        await migrate(admin_pool)  # as installations did before: every object is the administrator's
        async with connected(roles.admin_url) as admin:
            await admin.execute("INSERT INTO mailgun.bounces (domain, address, sync_state, synced_at) "
                                "VALUES ($1, 'old@example.com', 'synced', now())", DOMAIN)
    printed = await invoke("grants", "--worker-role", roles.worker, "--app-role", roles.app, env={})
    assert printed.code == 0
    assert printed.out.startswith("BEGIN;\n") and printed.out.endswith("COMMIT;\n")

    async with connected(roles.admin_url) as admin:
        await admin.execute(printed.out)  # as `| psql` would
        assert await objects_not_owned_by(admin, roles.worker) == []

    migrated = await invoke("migrate", env={"DATABASE_URL": roles.worker_url})
    assert migrated.code == 0, migrated.err
    async with connected(roles.app_url) as app:  # the removal trigger now runs as the worker's role
        await app.execute("DELETE FROM mailgun.bounces WHERE address = 'old@example.com'")
    await run_ok(invoke, worker_env(roles, emulator))


async def test_granting_again_takes_back_rights_given_by_hand(least_privileged, invoke):
    roles = least_privileged
    async with connected(roles.admin_url) as admin:
        await admin.execute(f"GRANT SELECT ON mailgun.webhook_tokens TO {roles.app}; "
                            f"GRANT UPDATE (sync_state) ON mailgun.bounces TO {roles.app}; "
                            f"GRANT CREATE ON SCHEMA mailgun TO {roles.app}")
    # The worker's role, as the schema's owner, grants the applications' role on its own.
    again = await invoke("grants", "--app-role", roles.app, "--apply", env={"DATABASE_URL": roles.worker_url})
    assert again.code == 0, again.err
    async with connected(roles.admin_url) as admin:
        assert await admin.fetchval(
            "SELECT has_table_privilege($1::name, 'mailgun.webhook_tokens', 'SELECT') "
            "OR has_column_privilege($1::name, 'mailgun.bounces', 'sync_state', 'UPDATE') "
            "OR has_schema_privilege($1::name, 'mailgun', 'CREATE')", roles.app) is False
        assert await admin.fetchval(
            "SELECT has_table_privilege($1::name, 'mailgun.bounces', 'DELETE')", roles.app)


@pytest.mark.parametrize("argv, says", [
    (["--app-role", "app'; DROP SCHEMA mailgun; --"], "--app-role: "),
    (["--app-role", "app", "--worker-role", 'x"y'], "--worker-role: "),
    (["--app-role", "same", "--worker-role", "same"], "--app-role: must not be the worker's role"),
])
async def test_a_role_name_the_command_cannot_quote_safely_exits_2_naming_the_flag(invoke, argv, says):
    outcome = await invoke("grants", *argv, env={})
    assert outcome.code == 2
    assert outcome.out == ""
    assert outcome.err.startswith(f"mailgun-sync: {says}")


async def test_printed_for_the_applications_role_alone_the_script_hands_nothing_over(invoke):
    outcome = await invoke("grants", "--app-role", "app", env={})
    assert outcome.code == 0
    assert "OWNER TO" not in outcome.out and 'GRANT USAGE ON SCHEMA mailgun TO "app";' in outcome.out
