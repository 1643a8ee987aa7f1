-- Least privilege: what the worker's role and the applications' role may do in schema `mailgun`.
--
-- `mailgun-sync grants --worker-role W --app-role A` prints both sections below (or applies them
-- with --apply), `mailgun-sync grants --app-role A` the second one only, and
-- `mailgun-sync migrate --app-role A` applies the second one after the migrations, in their
-- transaction. Placeholders in braces are role names, put in as quoted identifiers:
--   {worker_role} the role the worker connects as (DATABASE_URL's user): it owns the schema and
--                 runs the migrations; no superuser, no right to create schemas;
--   {app_role}    the role the applications connect as.
-- The command accepts only names of letters, digits and _ . @ - so that a quoted name is safe in
-- the string literals below too. To run a section by hand, put the names in yourself.

-- name: setup
-- Run by an administrator (a superuser, or a role that owns the database and is a member of the
-- roles involved) once, before the first `migrate`, and again to hand over what another role
-- (a superuser that ran `migrate` before) created in the schema.
--
-- The worker's role owns schema `mailgun` and everything in it: it can then create, alter and
-- drop the schema's objects (the migrations) and nothing outside it. On the database it needs to
-- connect and to create temporary tables (a pull stages Mailgun's list in one), which PUBLIC
-- usually has anyway; the application's role needs to connect.
CREATE SCHEMA IF NOT EXISTS mailgun AUTHORIZATION {worker_role};
ALTER SCHEMA mailgun OWNER TO {worker_role};
DO $grants$
DECLARE
    object record;
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO {worker_role}', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO {app_role}', current_database());
    -- Tables (their indexes, row types and the sequences of their serial columns go with them),
    -- views, and sequences of their own.
    FOR object IN
        SELECT c.oid::regclass AS name,
               CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                              WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END AS kind
        FROM pg_class c
        WHERE c.relnamespace = 'mailgun'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                            AND d.deptype IN ('a', 'i'))
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO {worker_role}', object.kind, object.name);
    END LOOP;
    FOR object IN
        SELECT p.oid::regprocedure AS name FROM pg_proc p
        WHERE p.pronamespace = 'mailgun'::regnamespace AND p.prokind IN ('f', 'p')
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO {worker_role}', object.name);
    END LOOP;
    -- Enums, domains, ranges and composite types of their own (not a table's row type).
    FOR object IN
        SELECT t.oid::regtype AS name FROM pg_type t
        LEFT JOIN pg_class c ON c.oid = t.typrelid
        WHERE t.typnamespace = 'mailgun'::regnamespace AND t.typtype IN ('e', 'd', 'r', 'c')
          AND (t.typtype <> 'c' OR c.relkind = 'c')
    LOOP
        EXECUTE format('ALTER TYPE %s OWNER TO {worker_role}', object.name);
    END LOOP;
END
$grants$;

-- name: app_grants
-- Run by the worker's role (the schema's owner) or an administrator, after every `migrate`
-- (`migrate --app-role` does it): it is idempotent, and takes back whatever the application's
-- role held in the schema before granting exactly this. Nothing is granted by default privileges:
-- a table a later migration adds stays closed to applications until this section names it. Each
-- table is granted once a migration has created it, so this also runs before the first `migrate`.
--
-- What applications do (README, "The mirror: the application interface"):
-- - read the four lists, insert and delete rows, and update a row's data (to correct a rejected
--   row, or drop unsubscribe tags); the worker's bookkeeping columns (sync_state, sync_error,
--   synced_at, sent_at, updated_at) and the computed keys are not theirs to write;
-- - read the run records (sync_runs) and the change log (changes).
-- Not theirs: mailgun.removals (queued by the lists' triggers, which run as the schema's owner:
-- migration 0011), webhook_tokens, backfill_pages, backfill_progress, discovered_domains,
-- schema_migrations, any sequence (the lists have none; the others' are the worker's), DDL.
DO $grants$
BEGIN
    REVOKE ALL ON SCHEMA mailgun FROM {app_role};
    REVOKE ALL ON ALL TABLES IN SCHEMA mailgun FROM {app_role};
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA mailgun FROM {app_role};
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA mailgun FROM {app_role};
    GRANT USAGE ON SCHEMA mailgun TO {app_role};
    IF to_regclass('mailgun.bounces') IS NOT NULL THEN
        GRANT SELECT, DELETE ON mailgun.bounces TO {app_role};
        GRANT INSERT (domain, address, code, error, created_at),
              UPDATE (domain, address, code, error, created_at) ON mailgun.bounces TO {app_role};
    END IF;
    IF to_regclass('mailgun.unsubscribes') IS NOT NULL THEN
        GRANT SELECT, DELETE ON mailgun.unsubscribes TO {app_role};
        GRANT INSERT (domain, address, tags, created_at),
              UPDATE (domain, address, tags, created_at) ON mailgun.unsubscribes TO {app_role};
    END IF;
    IF to_regclass('mailgun.complaints') IS NOT NULL THEN
        GRANT SELECT, DELETE ON mailgun.complaints TO {app_role};
        GRANT INSERT (domain, address, created_at),
              UPDATE (domain, address, created_at) ON mailgun.complaints TO {app_role};
    END IF;
    IF to_regclass('mailgun.allowlist') IS NOT NULL THEN
        GRANT SELECT, DELETE ON mailgun.allowlist TO {app_role};
        GRANT INSERT (domain, type, value, reason, created_at),
              UPDATE (domain, type, value, reason, created_at) ON mailgun.allowlist TO {app_role};
    END IF;
    IF to_regclass('mailgun.sync_runs') IS NOT NULL THEN
        GRANT SELECT ON mailgun.sync_runs TO {app_role};
    END IF;
    IF to_regclass('mailgun.changes') IS NOT NULL THEN
        GRANT SELECT ON mailgun.changes TO {app_role};
    END IF;
END
$grants$;
