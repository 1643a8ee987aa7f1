-- Named queries, loaded once by worker/sql.py.
--
-- `-- name: NAME` starts a query; `NAME@LIST` replaces NAME for that list only. Placeholders in
-- braces are identifiers from a fixed table in worker/store.py, never values:
--   {table} the mirror table, {list} the list's name, {cols} its data columns,
--   {r_cols}/{m_cols} the same columns of `r` (remote) and `m` (mirror), {set_cols} `col = r.col, ...`.
-- Values are always $n parameters. Every query about one list takes $1 = domain.

-- name: create_migrations_table
CREATE SCHEMA IF NOT EXISTS mailgun;
CREATE TABLE IF NOT EXISTS mailgun.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: lock_migrations
-- Held to the end of the migrating transaction, so concurrent starts apply each migration once.
SELECT pg_advisory_xact_lock(hashtext('mailgun-sync'), 0);

-- name: migrations_table_exists
SELECT to_regclass('mailgun.schema_migrations') IS NOT NULL;

-- name: applied_migrations
SELECT version FROM mailgun.schema_migrations ORDER BY version;

-- name: record_migration
-- $1 version, $2 name
INSERT INTO mailgun.schema_migrations (version, name) VALUES ($1, $2);

-- name: try_lock_list
-- $1 domain, $2 list. Session-level: released explicitly, or by PostgreSQL if the process dies.
SELECT pg_try_advisory_lock(hashtext('mailgun-sync'), hashtext($1 || '/' || $2));

-- name: unlock_list
SELECT pg_advisory_unlock(hashtext('mailgun-sync'), hashtext($1 || '/' || $2));

-- name: mark_worker_writes
-- Tells the mirror's triggers that this transaction's writes are the worker's, not an application's.
SELECT set_config('mailgun_sync.writer', 'worker', true);

-- name: create_staging
-- Session-private tables for one reconcile: `staging` takes the pull as it arrives, `remote` is
-- the list once complete, one row per lower(address).
DROP TABLE IF EXISTS pg_temp.staging, pg_temp.remote;
CREATE TEMP TABLE staging (address text NOT NULL, code text, error text, created_at timestamptz, tags text[]);

-- name: drop_staging
DROP TABLE IF EXISTS pg_temp.staging, pg_temp.remote;

-- name: build_remote
-- The latest record per address wins; created_at is filled in for records that came without one.
CREATE TEMP TABLE remote AS
SELECT DISTINCT ON (lower(address))
       lower(address) AS key, address, coalesce(code, '550') AS code, coalesce(error, '') AS error,
       coalesce(created_at, now()) AS created_at, coalesce(tags, '{*}') AS tags
FROM staging
ORDER BY lower(address), created_at DESC NULLS LAST;

-- name: merge_remote_tags
-- The legacy API lists an unsubscribe once per tag: join the tags of repeated addresses.
UPDATE remote r SET tags = merged.tags
FROM (
    SELECT lower(address) AS key, array_agg(DISTINCT tag ORDER BY tag) AS tags
    FROM staging CROSS JOIN LATERAL unnest(coalesce(tags, '{*}')) AS tag
    WHERE lower(address) IN (SELECT lower(address) FROM staging GROUP BY 1 HAVING count(*) > 1)
    GROUP BY 1
) AS merged
WHERE r.key = merged.key;

-- name: analyze_remote
ANALYZE remote;

-- name: plan
-- $1 domain, $2 when the pull started. What applying the pull would do.
SELECT
    (SELECT count(*) FROM remote r
      WHERE NOT EXISTS (SELECT 1 FROM {table} m WHERE m.domain = $1 AND lower(m.address) = r.key)) AS inserts,
    (SELECT count(*) FROM {table} m JOIN remote r ON lower(m.address) = r.key
      WHERE m.domain = $1 AND m.sync_state = 'synced' AND m.synced_at < $2
        AND (m.address, {m_cols}) IS DISTINCT FROM (r.address, {r_cols})) AS updates,
    (SELECT count(*) FROM {table} m
      WHERE m.domain = $1 AND m.sync_state = 'synced' AND m.synced_at < $2
        AND NOT EXISTS (SELECT 1 FROM remote r WHERE r.key = lower(m.address))) AS removals,
    (SELECT count(*) FROM {table} m WHERE m.domain = $1 AND m.sync_state = 'synced') AS synced_rows,
    (SELECT count(*) FROM {table} m JOIN remote r ON lower(m.address) = r.key
      WHERE m.domain = $1 AND m.sync_state IN ('pending', 'rejected')) AS adoptions,
    (SELECT count(*) FROM {table} m
      WHERE m.domain = $1 AND m.sync_state = 'pending'
        AND NOT EXISTS (SELECT 1 FROM remote r WHERE r.key = lower(m.address))) AS pushes;

-- name: tag_pushes
-- $1 domain: pending unsubscribes Mailgun has, but with fewer tags; they are pushed for the rest.
SELECT count(*) FROM mailgun.unsubscribes m JOIN remote r ON lower(m.address) = r.key
WHERE m.domain = $1 AND m.sync_state = 'pending' AND NOT r.tags @> m.tags;

-- name: adopt
-- $1 domain, $2 run id. Pending or rejected rows Mailgun already has become synced, with its data
-- and its spelling of the address (so anything pushed later names the record Mailgun has).
WITH adopted AS (
    UPDATE {table} m
    SET address = r.address, {set_cols}, sync_state = 'synced', sync_error = NULL, synced_at = now()
    FROM remote r
    WHERE m.domain = $1 AND lower(m.address) = r.key AND m.sync_state IN ('pending', 'rejected')
    RETURNING m.address
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action)
    SELECT $2, $1, '{list}', address, 'synced' FROM adopted
    RETURNING 1
)
SELECT count(*) FROM logged;

-- name: adopt@unsubscribes
-- As `adopt`, but tags are a set: the row takes the union, and stays pending (to be pushed) when
-- it holds tags Mailgun does not have yet.
WITH adopted AS (
    UPDATE {table} m
    SET address = r.address,
        tags = (SELECT array_agg(DISTINCT t ORDER BY t) FROM unnest(m.tags || r.tags) AS t),
        created_at = r.created_at,
        sync_state = CASE WHEN r.tags @> m.tags THEN 'synced' ELSE 'pending' END::mailgun.sync_state,
        sync_error = NULL,
        synced_at = CASE WHEN r.tags @> m.tags THEN now() ELSE m.synced_at END
    FROM remote r
    WHERE m.domain = $1 AND lower(m.address) = r.key AND m.sync_state IN ('pending', 'rejected')
    RETURNING m.address, m.sync_state
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action)
    SELECT $2, $1, '{list}', address, 'synced' FROM adopted WHERE sync_state = 'synced'
    RETURNING 1
)
SELECT count(*) FROM logged;

-- name: update_changed
-- $1 domain, $2 run id, $3 when the pull started. Remote wins for synced rows, address spelling
-- included; a row synced after
-- the pull started (by another path) is newer than the pull and left alone.
WITH changed AS (
    UPDATE {table} m SET address = r.address, {set_cols}, synced_at = now()
    FROM remote r
    WHERE m.domain = $1 AND lower(m.address) = r.key AND m.sync_state = 'synced'
      AND m.synced_at < $3 AND (m.address, {m_cols}) IS DISTINCT FROM (r.address, {r_cols})
    RETURNING m.address
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action)
    SELECT $2, $1, '{list}', address, 'update' FROM changed
    RETURNING 1
)
SELECT count(*) FROM logged;

-- name: insert_remote_only
-- $1 domain, $2 run id. A row an application inserts meanwhile wins the conflict and is adopted
-- by the next run.
WITH inserted AS (
    INSERT INTO {table} (domain, address, {cols}, sync_state, synced_at)
    SELECT $1, r.address, {r_cols}, 'synced', now()
    FROM remote r
    WHERE NOT EXISTS (SELECT 1 FROM {table} m WHERE m.domain = $1 AND lower(m.address) = r.key)
    ON CONFLICT (domain, lower(address)) DO NOTHING
    RETURNING address
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action)
    SELECT $2, $1, '{list}', address, 'insert' FROM inserted
    RETURNING 1
)
SELECT count(*) FROM logged;

-- name: remove_vanished
-- $1 domain, $2 run id, $3 when the pull started. Only ever run after a complete pull.
WITH removed AS (
    DELETE FROM {table} m
    WHERE m.domain = $1 AND m.sync_state = 'synced' AND m.synced_at < $3
      AND NOT EXISTS (SELECT 1 FROM remote r WHERE r.key = lower(m.address))
    RETURNING m.address
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action)
    SELECT $2, $1, '{list}', address, 'remove' FROM removed
    RETURNING 1
)
SELECT count(*) FROM logged;

-- name: select_pending
-- $1 domain, $2 the last lower(address) already read ('' to start), $3 how many. `version` lets the
-- worker mark a row synced only if nobody changed it while it was being pushed.
SELECT address, {cols}, xmin::text AS version
FROM {table}
WHERE domain = $1 AND sync_state = 'pending' AND lower(address) > $2
ORDER BY lower(address)
LIMIT $3;

-- name: mark_pushed
-- $1 domain, $2 run id, $3 addresses, $4 versions: rows Mailgun confirmed with a 2xx. Mailgun keeps
-- whole seconds, so the row does too, or the next pull would see a changed record.
WITH pushed AS (
    UPDATE {table} m
    SET sync_state = 'synced', sync_error = NULL, synced_at = now(),
        created_at = date_trunc('second', m.created_at)
    FROM unnest($3::text[], $4::text[]) AS p(address, version)
    WHERE m.domain = $1 AND lower(m.address) = lower(p.address) AND m.address = p.address
      AND m.xmin::text = p.version AND m.sync_state = 'pending'
    RETURNING m.address
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action)
    SELECT $2, $1, '{list}', address, 'push' FROM pushed
    RETURNING 1
)
SELECT count(*) FROM logged;

-- name: mark_rejected
-- $1 domain, $2 run id, $3 addresses, $4 versions, $5 reasons: rows refused locally or by Mailgun.
WITH refused AS (
    UPDATE {table} m SET sync_state = 'rejected', sync_error = p.reason
    FROM unnest($3::text[], $4::text[], $5::text[]) AS p(address, version, reason)
    WHERE m.domain = $1 AND lower(m.address) = lower(p.address) AND m.address = p.address
      AND m.xmin::text = p.version AND m.sync_state = 'pending'
    RETURNING m.address, p.reason
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action, detail)
    SELECT $2, $1, '{list}', address, 'reject', reason FROM refused
    RETURNING 1
)
SELECT count(*) FROM logged;

-- name: record_run
-- $1 run id, $2 domain, $3 list, $4 status, $5 dry run,
-- $6..$12 pulled, inserted, updated, removed, adopted, pushed, rejected, $13 error, $14 started, $15 finished
INSERT INTO mailgun.sync_runs (run_id, domain, list, status, dry_run, pulled, inserted, updated, removed,
                               adopted, pushed, rejected, error, started_at, finished_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15);

-- name: database_now
SELECT clock_timestamp();

-- name: demo_local_additions
-- $1 domain. What an application does to add suppressions: plain INSERTs, one address invalid.
WITH bounces AS (
    INSERT INTO mailgun.bounces (domain, address, code, error) VALUES
        ($1, 'new.customer@example.net', '550', 'bounced at our own MTA'),
        ($1, 'moved.away@example.com', '551', 'user has moved'),
        ($1, 'not-an-address', '550', 'typo in the CRM')
    RETURNING 1
), unsubscribes AS (
    INSERT INTO mailgun.unsubscribes (domain, address, tags) VALUES ($1, 'crm.optout@example.org', '{newsletter}')
    RETURNING 1
), complaints AS (
    INSERT INTO mailgun.complaints (domain, address) VALUES ($1, 'angry.reader@example.com')
    RETURNING 1
)
SELECT (SELECT count(*) FROM bounces) + (SELECT count(*) FROM unsubscribes) + (SELECT count(*) FROM complaints);

-- name: demo_latest_changes
SELECT list, address, action, detail FROM mailgun.changes
WHERE run_id = (SELECT run_id FROM mailgun.changes ORDER BY id DESC LIMIT 1)
ORDER BY action, list, address;

-- name: demo_count_pending
SELECT (SELECT count(*) FROM mailgun.bounces WHERE sync_state = 'pending')
     + (SELECT count(*) FROM mailgun.unsubscribes WHERE sync_state = 'pending')
     + (SELECT count(*) FROM mailgun.complaints WHERE sync_state = 'pending');

-- name: count_states
-- $1 domain: rows waiting for Mailgun, and rows it (or local validation) refused.
SELECT count(*) FILTER (WHERE sync_state = 'pending') AS pending,
       count(*) FILTER (WHERE sync_state = 'rejected') AS rejected
FROM {table} WHERE domain = $1;

-- name: latest_runs
-- The last recorded run of every (domain, list).
SELECT DISTINCT ON (domain, list) domain, list, status, pulled, inserted, updated, removed, adopted,
       pushed, rejected, error, started_at, finished_at
FROM mailgun.sync_runs
ORDER BY domain, list, finished_at DESC;

-- name: ping
SELECT 1;

-- name: backfill_progress
-- $1 domain, $2 list: where an unfinished backfill of this list stopped, if one did.
SELECT last_address, pages, records, started_at FROM mailgun.backfill_progress
WHERE domain = $1 AND list = $2;

-- name: backfill_save_progress
-- $1 domain, $2 list, $3 the page's last address, $4 its record count. Committed with the page.
INSERT INTO mailgun.backfill_progress (domain, list, last_address, pages, records)
VALUES ($1, $2, $3, 1, $4)
ON CONFLICT (domain, list) DO UPDATE
SET last_address = $3, pages = backfill_progress.pages + 1, records = backfill_progress.records + $4,
    updated_at = clock_timestamp();

-- name: backfill_stage
-- $1 domain, $2 list: a completed backfill's pages fill this session's staging table.
INSERT INTO staging (address, code, error, created_at, tags)
SELECT address, code, error, created_at, tags FROM mailgun.backfill_pages
WHERE domain = $1 AND list = $2;

-- name: backfill_clear
-- $1 domain, $2 list
WITH pages AS (DELETE FROM mailgun.backfill_pages WHERE domain = $1 AND list = $2)
DELETE FROM mailgun.backfill_progress WHERE domain = $1 AND list = $2;
