-- Named queries, loaded once by worker/sql.py.
--
-- `-- name: NAME` starts a query; `NAME@LIST` replaces NAME for that list only. Placeholders in
-- braces are identifiers from a fixed table in worker/store.py, never values:
--   {table} the mirror table, {list} the list's name, {cols} its data columns,
--   {r_cols}/{m_cols} the same columns of `r` (remote) and `m` (mirror), {set_cols} `col = r.col, ...`,
--   {address}/{address_key} the mirror's address column and its key (the allowlist's `value`).
-- Values are always $n parameters. Every query about one list takes $1 = domain.
--
-- A key computed here, lower(address COLLATE "C"), carries the collation "C"; compared with a
-- stored key it is cast back (COLLATE "default"), the stored keys' own, or their indexes go unused.
-- Unsubscribe tags are sorted COLLATE "C" (code-point order, as the worker sorts Mailgun's), so
-- that two arrays of one set are equal whatever the database's default collation.

-- name: create_migrations_table
-- The schema is created only when it is absent: CREATE SCHEMA IF NOT EXISTS needs the right to
-- create schemas in the database even when it exists, which a worker role that owns the schema an
-- administrator created for it (sql/roles.sql) does not have.
DO $$
BEGIN
    IF to_regnamespace('mailgun') IS NULL THEN
        CREATE SCHEMA mailgun;
    END IF;
END
$$;
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
-- Session-private tables for one reconcile: `staging` takes the pull as it arrives (the key is
-- lower(address), computed by the worker where it can be, else NULL; created_at is text, cast
-- once later; `skipped` marks a record Mailgun has that the mirror cannot hold, staged by its
-- address only so that the mirror's row of that address is left alone); `diff` holds only the
-- rows that need an action.
DROP TABLE IF EXISTS pg_temp.staging, pg_temp.staging_unique, pg_temp.diff;
CREATE TEMP TABLE staging (key text, address text NOT NULL, code text, error text, created_at text,
                           tags text[], skipped boolean NOT NULL);
CREATE TEMP TABLE diff (key text NOT NULL, action text NOT NULL, address text, code text, error text,
                        created_at timestamptz, tags text[]);

-- name: drop_staging
DROP TABLE IF EXISTS pg_temp.staging, pg_temp.staging_unique, pg_temp.diff;

-- name: staging_has_duplicates
-- Only asked when the worker could not rule repeats out itself (non-ASCII addresses, a backfill).
SELECT EXISTS (SELECT 1 FROM staging GROUP BY coalesce(key, lower(address COLLATE "C")) HAVING count(*) > 1);

-- name: dedupe_staging
-- One row per address, every key filled in: the latest record wins; repeated unsubscribes (the
-- legacy API lists one row per tag) join their tags.
CREATE TEMP TABLE staging_unique AS
SELECT DISTINCT ON (k) k AS key, address, code, error, created_at, tags, skipped
FROM (SELECT coalesce(key, lower(address COLLATE "C")) AS k, * FROM staging) AS s
ORDER BY k, created_at::timestamptz DESC NULLS LAST;
UPDATE staging_unique u SET tags = merged.tags
FROM (
    SELECT coalesce(key, lower(address COLLATE "C")) AS key, array_agg(DISTINCT tag COLLATE "C" ORDER BY tag COLLATE "C") AS tags
    FROM staging CROSS JOIN LATERAL unnest(tags) AS tag
    GROUP BY 1 HAVING count(*) > 1
) AS merged
WHERE u.key = merged.key AND u.tags IS NOT NULL;
DROP TABLE staging;
ALTER TABLE staging_unique RENAME TO staging;

-- name: analyze_staging
ANALYZE staging;

-- name: dry_run_remove_staged
-- $1 addresses deleted whole. A dry run sends nothing, but a run carries out the queued removals
-- before it pulls: these dry_run_ queries take them out of the staged list instead, as Mailgun
-- would list it after them, so that the dry run's counts are the run's. Mailgun deletes the
-- record of the spelling asked for. Returns the held and the skipped records taken out.
WITH gone AS (
    DELETE FROM staging s USING unnest($1::text[]) AS w(address)
    WHERE s.address = w.address
    RETURNING s.skipped
)
SELECT count(*) FILTER (WHERE NOT skipped) AS records, count(*) FILTER (WHERE skipped) AS skipped
FROM gone;

-- name: dry_run_drop_staged_tags
-- $1 addresses, $2 the unsubscribe tag dropped from each (one pair a removal).
UPDATE staging s SET tags = ARRAY(SELECT t FROM unnest(coalesce(s.tags, '{*}')) AS t
                                  WHERE t <> ALL (d.tags))
FROM (SELECT address, array_agg(tag) AS tags FROM unnest($1::text[], $2::text[]) AS r(address, tag)
      GROUP BY address) AS d
WHERE s.address = d.address;

-- name: dry_run_remove_untagged
-- Mailgun removes an unsubscribe whose last tag goes. Returns the held and the skipped records.
WITH gone AS (
    DELETE FROM staging WHERE tags = '{}' RETURNING skipped
)
SELECT count(*) FILTER (WHERE NOT skipped) AS records, count(*) FILTER (WHERE skipped) AS skipped
FROM gone;

-- name: dry_run_other_spellings
-- $1 keys, $2 addresses, $3 removal times of records deleted whole: the records the pull finds of
-- the same mailbox under another spelling, older than the removal, which the run then deletes in
-- turn (see build_diff's requeue).
SELECT count(*) FROM staging s
JOIN unnest($1::text[], $2::text[], $3::timestamptz[]) AS w(key, address, removed_at)
  ON coalesce(s.key, lower(s.address COLLATE "C")) = w.key
WHERE NOT s.skipped AND s.address <> w.address
  AND coalesce(s.created_at::timestamptz, now()) < date_trunc('second', w.removed_at);

-- name: count_rows
SELECT count(*) FROM {table} WHERE domain = $1;

-- name: sample_addresses
-- $1 domain, $2 percent of the table's pages: addresses to cut the list into parallel ranges.
SELECT {address} AS address FROM {table} TABLESAMPLE SYSTEM ($2) WHERE domain = $1;

-- name: raise_work_mem
-- For this session only (the pool resets it): the diff's hash join of a million rows then stays in
-- memory instead of spilling to disk in batches, which takes about twice as long.
SET work_mem = '256MB';

-- name: build_diff
-- $1 domain, $2 when the pull started. One full join of the pulled list with the mirror's rows of
-- the domain; only rows needing an action are kept, with Mailgun's data:
--   insert  Mailgun has it, the mirror has no row
--   update  a synced row Mailgun has with other data (rows synced after the pull started are newer)
--   remove  a synced row Mailgun no longer has (same age rule)
--   adopt   a pending or rejected row Mailgun has: it becomes synced with Mailgun's data
--   push    a pending row Mailgun does not have
--   requeue a record the application removed, still at Mailgun after the removal was carried out
-- A skipped record (Mailgun has it, the mirror cannot hold it) asks for nothing: its address is
-- not gone from Mailgun, and its data cannot be taken.
INSERT INTO diff
SELECT DISTINCT ON (key) * FROM (
    SELECT coalesce(r.key, m.key) AS key,
           CASE
               WHEN r.skipped THEN NULL
               WHEN m.key IS NULL THEN
                   -- A record the application removed locally is not brought back: not while its
                   -- deletion at Mailgun is queued, nor when, after the removal was carried out,
                   -- Mailgun still lists the address under another spelling in a record older than
                   -- the removal: that one is queued for deletion in turn. The spelling deleted,
                   -- listed again, was added again; a record of the removal's second (Mailgun
                   -- keeps whole seconds) may be newer. Both are kept.
                   CASE (SELECT CASE WHEN x.done_at IS NULL THEN 'queued'
                                     WHEN r.address <> x.address
                                          AND r.created_at < date_trunc('second', x.removed_at) THEN 'requeue'
                                END
                         FROM mailgun.removals x WHERE x.domain = $1 AND x.list = '{list}'
                                                   AND x.address_key = r.key COLLATE "default"
                                                   AND x.tag = '')
                       WHEN 'queued' THEN NULL
                       WHEN 'requeue' THEN 'requeue'
                       ELSE 'insert'
                   END
               WHEN r.key IS NULL THEN
                   CASE WHEN m.sync_state = 'synced' AND m.synced_at < $2 THEN 'remove'
                        WHEN m.sync_state = 'pending' THEN 'push' END
               WHEN m.sync_state IN ('pending', 'rejected') THEN 'adopt'
               WHEN m.synced_at < $2 AND (m.address, {m_cols}) IS DISTINCT FROM (r.address, {r_cols})
                   THEN 'update'
           END AS action,
           r.address, r.code, r.error, r.created_at, r.tags
    FROM (
        SELECT coalesce(key, lower(address COLLATE "C")) AS key, address, coalesce(code, '550') AS code,
               coalesce(error, '') AS error, coalesce(created_at::timestamptz, now()) AS created_at,
               coalesce(tags, '{*}') AS tags, skipped
        FROM staging
    ) AS r
    FULL JOIN (
        SELECT {address_key} AS key, {address} AS address, {cols}, sync_state, synced_at
        FROM {table} WHERE domain = $1
    ) AS m ON m.key = r.key
) AS joined
WHERE action IS NOT NULL
-- Only if Mailgun listed one mailbox twice (say in two cases) does a key repeat here; the latest
-- record wins, as in dedupe_staging.
ORDER BY key, created_at DESC NULLS LAST;

-- name: analyze_diff
ANALYZE diff;

-- name: plan
-- $1 domain. What applying the diff would do.
SELECT count(*) FILTER (WHERE action = 'insert') AS inserts,
       count(*) FILTER (WHERE action = 'update') AS updates,
       count(*) FILTER (WHERE action = 'remove') AS removals,
       (SELECT count(*) FROM {table} WHERE domain = $1 AND sync_state = 'synced') AS synced_rows,
       count(*) FILTER (WHERE action = 'adopt') AS adoptions,
       count(*) FILTER (WHERE action = 'push') AS pushes,
       count(*) FILTER (WHERE action = 'requeue') AS requeues
FROM diff;

-- name: tag_pushes
-- $1 domain: pending unsubscribes Mailgun has, but with fewer tags; they are pushed for the rest.
SELECT count(*) FROM diff r JOIN mailgun.unsubscribes m ON m.domain = $1 AND m.address_key = r.key
WHERE r.action = 'adopt' AND m.sync_state = 'pending' AND NOT r.tags @> m.tags;

-- name: adopt
-- $1 domain, $2 run id, $3 when the pull started. Pending or rejected rows Mailgun already has
-- become synced, with its data and its spelling of the address (so anything pushed later names
-- the record Mailgun has). A row changed since the pull started is judged by the next run: the
-- pull cannot vouch for it (a backfill's pages may be hours old).
WITH adopted AS (
    UPDATE {table} m
    SET {address} = r.address, {set_cols}, sync_state = 'synced', sync_error = NULL, synced_at = now()
    FROM diff r
    WHERE r.action = 'adopt' AND m.domain = $1 AND m.{address_key} = r.key
      AND m.sync_state IN ('pending', 'rejected') AND m.updated_at < $3
    RETURNING m.{address} AS address
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action)
    SELECT $2, $1, '{list}', address, 'synced' FROM adopted
    RETURNING 1
)
SELECT count(*) FROM logged;

-- name: adopt@unsubscribes
-- As `adopt`, but tags are a set: a pending row takes the union, less the tags the application
-- dropped whose removal is still queued, and stays pending (to be pushed) when it holds tags
-- Mailgun does not have yet; a rejected row takes Mailgun's tags (it is not sent again until the
-- application changes it).
WITH adopted AS (
    UPDATE {table} m
    SET address = r.address,
        tags = CASE WHEN m.sync_state = 'rejected' THEN r.tags
                    ELSE (SELECT array_agg(DISTINCT t COLLATE "C" ORDER BY t COLLATE "C")
                          FROM unnest(m.tags || r.tags) AS t
                          WHERE t = ANY (m.tags)
                             OR NOT EXISTS (SELECT 1 FROM mailgun.removals x
                                            WHERE x.domain = $1 AND x.list = '{list}'
                                              AND x.address_key = m.address_key AND x.tag = t
                                              AND x.done_at IS NULL)) END,
        created_at = r.created_at,
        sync_state = CASE WHEN m.sync_state = 'rejected' OR r.tags @> m.tags THEN 'synced'
                          ELSE 'pending' END::mailgun.sync_state,
        sync_error = NULL,
        synced_at = CASE WHEN m.sync_state = 'rejected' OR r.tags @> m.tags THEN now()
                         ELSE m.synced_at END
    FROM diff r
    WHERE r.action = 'adopt' AND m.domain = $1 AND m.address_key = r.key
      AND m.sync_state IN ('pending', 'rejected') AND m.updated_at < $3
    RETURNING m.address, m.sync_state
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action)
    SELECT $2, $1, '{list}', address, 'synced' FROM adopted WHERE sync_state = 'synced'
    RETURNING 1
)
SELECT count(*) FROM logged;

-- name: update_changed
-- $1 domain, $2 run id, $3 when the pull started. Remote wins for synced rows, address spelling
-- included. The conditions are checked again: an application may have written meanwhile.
WITH changed AS (
    UPDATE {table} m SET {address} = r.address, {set_cols}, synced_at = now()
    FROM diff r
    WHERE r.action = 'update' AND m.domain = $1 AND m.{address_key} = r.key
      AND m.sync_state = 'synced' AND m.synced_at < $3
    RETURNING m.{address} AS address
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action)
    SELECT $2, $1, '{list}', address, 'update' FROM changed
    RETURNING 1
)
SELECT count(*) FROM logged;

-- name: update_changed@unsubscribes
-- As `update_changed`, less the tags the application dropped whose removal is still queued: taken
-- back from Mailgun before their DELETE is sent, they would be sent back with the row (see
-- resend_after_removal). Unless that is every tag: Mailgun drops the record with its last tag.
WITH changed AS (
    UPDATE {table} m
    SET address = r.address,
        tags = coalesce((SELECT array_agg(t COLLATE "C" ORDER BY t COLLATE "C") FROM unnest(r.tags) AS t
                         WHERE NOT EXISTS (SELECT 1 FROM mailgun.removals x
                                           WHERE x.domain = $1 AND x.list = '{list}'
                                             AND x.address_key = m.address_key AND x.tag = t
                                             AND x.done_at IS NULL)), r.tags),
        created_at = r.created_at, synced_at = now()
    FROM diff r
    WHERE r.action = 'update' AND m.domain = $1 AND m.address_key = r.key
      AND m.sync_state = 'synced' AND m.synced_at < $3
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
    INSERT INTO {table} (domain, {address}, {cols}, sync_state, synced_at)
    SELECT $1, r.address, {r_cols}, 'synced', now()
    FROM diff r
    WHERE r.action = 'insert'
    ON CONFLICT (domain, {address_key}) DO NOTHING
    RETURNING {address} AS address
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action)
    SELECT $2, $1, '{list}', address, 'insert' FROM inserted
    RETURNING 1
)
SELECT count(*) FROM logged;

-- name: requeue_removals
-- $1 domain. Removals carried out whose record Mailgun still lists (see build_diff) are queued
-- again under the spelling Mailgun lists, for the next run to send.
UPDATE mailgun.removals x SET address = r.address, sent_at = NULL, done_at = NULL, last_error = NULL
FROM diff r
WHERE r.action = 'requeue' AND x.domain = $1 AND x.list = '{list}' AND x.address_key = r.key
  AND x.tag = '' AND x.done_at IS NOT NULL;

-- name: remove_vanished
-- $1 domain, $2 run id, $3 when the pull started. Only ever run after a complete pull.
WITH removed AS (
    DELETE FROM {table} m
    USING diff r
    WHERE r.action = 'remove' AND m.domain = $1 AND m.{address_key} = r.key
      AND m.sync_state = 'synced' AND m.synced_at < $3
    RETURNING m.{address} AS address
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action)
    SELECT $2, $1, '{list}', address, 'remove' FROM removed
    RETURNING 1
), overtaken AS (
    -- An unfinished backfill's pages may list what was just removed (see backfill_overtaken).
    UPDATE mailgun.backfill_progress SET overtaken = true
    WHERE domain = $1 AND list = '{list}' AND EXISTS (SELECT 1 FROM removed)
)
SELECT count(*) FROM logged;

-- name: select_pending
-- $1 domain, $2 the last address_key already read ('' to start), $3 how many, $4 when the pull
-- started. Only rows the pull has judged: one added since may be a record Mailgun has, and waits
-- for the next run to find out. `version` lets the worker mark a row synced only if nobody
-- changed it while it was being pushed.
SELECT {address} AS address, {address_key} AS address_key, {cols}, xmin::text AS version
FROM {table}
WHERE domain = $1 AND sync_state = 'pending' AND {address_key} > $2 AND updated_at < $4
ORDER BY {address_key}
LIMIT $3;

-- name: select_planned_pushes
-- $1 domain, $2 the last address_key already read ('' to start), $3 how many. For a dry run: the
-- pending rows the diff would push (Mailgun does not have them), read as select_pending reads
-- them, so that they are validated locally as a run validates them.
SELECT m.{address} AS address, m.{address_key} AS address_key, {m_cols}, m.xmin::text AS version
FROM {table} m JOIN diff d ON d.key = m.{address_key} AND d.action = 'push'
WHERE m.domain = $1 AND m.sync_state = 'pending' AND m.{address_key} > $2
ORDER BY m.{address_key}
LIMIT $3;

-- name: mark_sending
-- $1 domain, $2 addresses, $3 versions: pending rows about to be sent, written down before the
-- request leaves (Mailgun may hold them from then on, answered or not), so that an application's
-- DELETE meanwhile is carried out at Mailgun. Only rows unchanged since they were read are sent;
-- each is returned with its new version.
UPDATE {table} m SET sent_at = clock_timestamp()
FROM unnest($2::text[], $3::text[]) AS p(address, version)
WHERE m.domain = $1 AND m.{address_key} = lower(p.address COLLATE "C") COLLATE "default"
  AND m.{address} = p.address
  AND m.xmin::text = p.version AND m.sync_state = 'pending'
RETURNING m.{address} AS address, m.xmin::text AS version;

-- name: mark_pushed
-- $1 domain, $2 run id, $3 addresses, $4 versions: rows Mailgun confirmed with a 2xx. Mailgun keeps
-- whole seconds, so the row does too, or the next pull would see a changed record.
WITH pushed AS (
    UPDATE {table} m
    SET sync_state = 'synced', sync_error = NULL, synced_at = now(),
        created_at = date_trunc('second', m.created_at)
    FROM unnest($3::text[], $4::text[]) AS p(address, version)
    WHERE m.domain = $1 AND m.{address_key} = lower(p.address COLLATE "C") COLLATE "default"
      AND m.{address} = p.address
      AND m.xmin::text = p.version AND m.sync_state = 'pending'
    RETURNING m.{address} AS address
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
    WHERE m.domain = $1 AND m.{address_key} = lower(p.address COLLATE "C") COLLATE "default"
      AND m.{address} = p.address
      AND m.xmin::text = p.version AND m.sync_state = 'pending'
    RETURNING m.{address} AS address, p.reason
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action, detail)
    SELECT $2, $1, '{list}', address, 'reject', reason FROM refused
    RETURNING 1
)
SELECT count(*) FROM logged;

-- name: record_run
-- $1 run id, $2 domain, $3 list, $4 status, $5 dry run,
-- $6..$14 the counts in worker/runs.py's order: pulled, inserted, updated, removed, adopted, pushed,
-- rejected, deleted, skipped; $15 error, $16 started, $17 finished. Also the list's last run: the
-- one recorded last, since two processes' runs of a list never overlap (its lock) and their clocks
-- may disagree; and when one last ended ok, the latest of those recorded.
WITH run AS (
    INSERT INTO mailgun.sync_runs (run_id, domain, list, status, dry_run, pulled, inserted, updated,
                                   removed, adopted, pushed, rejected, deleted, skipped, error,
                                   started_at, finished_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
    RETURNING *
)
INSERT INTO mailgun.last_runs AS l
SELECT domain, list, run_id, status, pulled, inserted, updated, removed, adopted, pushed, rejected,
       deleted, skipped, error, started_at, finished_at,
       CASE WHEN status = 'ok' THEN finished_at END,
       CASE WHEN status IN ('failed', 'guarded') THEN 1 ELSE 0 END
FROM run
ON CONFLICT (domain, list) DO UPDATE
SET run_id = excluded.run_id, status = excluded.status, pulled = excluded.pulled,
    inserted = excluded.inserted, updated = excluded.updated, removed = excluded.removed,
    adopted = excluded.adopted, pushed = excluded.pushed, rejected = excluded.rejected,
    deleted = excluded.deleted, skipped = excluded.skipped, error = excluded.error,
    started_at = excluded.started_at, finished_at = excluded.finished_at,
    last_ok_at = GREATEST(excluded.last_ok_at, l.last_ok_at),
    failures_in_a_row = CASE WHEN excluded.status = 'ok' THEN 0
                             ELSE l.failures_in_a_row + excluded.failures_in_a_row END;

-- name: database_now
SELECT clock_timestamp();

-- name: count_states
-- $1 domain: rows waiting for Mailgun, and rows it (or local validation) refused.
SELECT count(*) FILTER (WHERE sync_state = 'pending') AS pending,
       count(*) FILTER (WHERE sync_state = 'rejected') AS rejected
FROM {table} WHERE domain = $1;

-- name: count_states_by_domain
-- Every domain's rows waiting for Mailgun, and rows it refused, from the lists' partial indexes.
SELECT domain, sum(pending)::bigint AS pending, sum(rejected)::bigint AS rejected FROM (
    SELECT domain, count(*) AS pending, 0 AS rejected FROM {table}
    WHERE sync_state = 'pending' GROUP BY domain
    UNION ALL
    SELECT domain, 0, count(*) FROM {table} WHERE sync_state = 'rejected' GROUP BY domain
) AS states GROUP BY domain;

-- name: pending_elsewhere
-- $1 domains: the pending rows of every other domain, by domain and list. Nothing syncs them: a
-- row whose domain is misspelt, or of a domain no longer configured, would wait for ever.
SELECT domain, list, count(*) AS pending_rows FROM (
    SELECT domain, 'bounces' AS list FROM mailgun.bounces WHERE sync_state = 'pending'
    UNION ALL
    SELECT domain, 'unsubscribes' FROM mailgun.unsubscribes WHERE sync_state = 'pending'
    UNION ALL
    SELECT domain, 'complaints' FROM mailgun.complaints WHERE sync_state = 'pending'
    UNION ALL
    SELECT domain, 'allowlist' FROM mailgun.allowlist WHERE sync_state = 'pending'
) AS pending
WHERE domain <> ALL ($1::text[])
GROUP BY domain, list
ORDER BY domain, list;

-- name: latest_runs
-- The last recorded run of every (domain, list).
SELECT domain, list, status, pulled, inserted, updated, removed, adopted, pushed, rejected, deleted,
       skipped, error, started_at, finished_at
FROM mailgun.last_runs;

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
-- $1 domain, $2 list: a completed backfill's pages fill this session's staging table; returns the
-- records staged and the placeholders of skipped ones among them.
WITH staged AS (
    INSERT INTO staging (key, address, code, error, created_at, tags, skipped)
    SELECT key, address, code, error, created_at, tags, skipped FROM mailgun.backfill_pages
    WHERE domain = $1 AND list = $2
    RETURNING skipped
)
SELECT count(*) FILTER (WHERE NOT skipped) AS records, count(*) FILTER (WHERE skipped) AS skipped
FROM staged;

-- name: backfill_overtaken
-- $1 domain, $2 list, $3 when the backfill started: has a run applied a complete pull of the list
-- (and so removed what Mailgun no longer had), or has a removal been carried out at Mailgun, since?
-- Then its saved pages may hold records deleted meanwhile. A guarded run removed nothing. Pages
-- older than the carried-out removals are kept (30 days) cannot be checked, and are read again.
-- `overtaken`: since, a run removed rows or Mailgun confirmed a deletion, marked in the statement
-- that wrote it down: whatever the run's record says, its clock, or whether it was pruned since.
SELECT EXISTS (SELECT 1 FROM mailgun.sync_runs WHERE domain = $1 AND list = $2 AND NOT dry_run
                                                 AND (status = 'ok' OR removed > 0) AND finished_at > $3)
    OR $3 < now() - interval '30 days'
    OR EXISTS (SELECT 1 FROM mailgun.removals WHERE domain = $1 AND list = $2 AND done_at > $3)
    OR EXISTS (SELECT 1 FROM mailgun.backfill_progress WHERE domain = $1 AND list = $2 AND overtaken);

-- name: backfill_clear
-- $1 domain, $2 list
WITH pages AS (DELETE FROM mailgun.backfill_pages WHERE domain = $1 AND list = $2)
DELETE FROM mailgun.backfill_progress WHERE domain = $1 AND list = $2;

-- name: queued_removals
-- $1 domain, $2 list: deletions at Mailgun the application asked for and not yet carried out,
-- oldest first; `tag` is '' for a whole record, else the one unsubscribe tag to drop.
SELECT id, address, address_key, tag, removed_at FROM mailgun.removals
WHERE domain = $1 AND list = $2 AND done_at IS NULL ORDER BY id;

-- name: count_synced
SELECT count(*) FROM {table} WHERE domain = $1 AND sync_state = 'synced';

-- name: removals_sending
-- $1 removal ids: written down before their DELETEs leave, so that a webhook arriving meanwhile
-- knows Mailgun may be losing the record. Returns the ids still queued: one cancelled since it was
-- read (the address added again) is not sent.
UPDATE mailgun.removals x SET sent_at = clock_timestamp()
FROM unnest($1::bigint[]) AS i(id)
WHERE x.id = i.id AND x.done_at IS NULL
RETURNING x.id;

-- name: removals_done
-- $1 run id, $2 domain, $3 list, $4 removal ids, $5 addresses, $6 tags, $7 removed_at, $8 the ids
-- Mailgun answered "not found": Mailgun confirmed these DELETEs (2xx) or no longer had the address
-- (its own 404), which `found` tells apart. Each is kept as
-- carried out; one cancelled while its DELETE was in flight (a newer webhook, or the address added
-- again) is put back on record as carried out, since the DELETE happened all the same.
WITH input AS (
    SELECT * FROM unnest($4::bigint[], $5::text[], $6::text[], $7::timestamptz[])
                  AS i(id, address, tag, removed_at)
), done AS (
    UPDATE mailgun.removals x SET done_at = clock_timestamp(), last_error = NULL,
                                  found = x.id <> ALL ($8::bigint[])
    FROM input i WHERE x.id = i.id AND x.done_at IS NULL
    RETURNING x.id, x.tag, x.address_key, x.sent_at
), moot AS (
    -- A record deleted whole takes its tags with it: the removals of its tags queued before its
    -- DELETE left are cleared with it, never sent. One queued since (the address added back with
    -- tags, one dropped again) stands, and so does every tag removal of a record whose removal
    -- was not carried out (cancelled: the address added back with fewer tags).
    -- (A tag's DELETE sent in an earlier run and failed is as moot: the run never sends a tag's
    -- DELETE beside its record's.)
    DELETE FROM mailgun.removals t USING done w
    WHERE w.tag = '' AND t.domain = $2 AND t.list = $3 AND t.address_key = w.address_key
      AND t.tag <> '' AND t.done_at IS NULL AND t.removed_at < w.sent_at
), recorded AS (
    INSERT INTO mailgun.removals AS x (domain, list, address, tag, removed_at, sent_at, done_at, found)
    SELECT $2, $3, i.address, i.tag, i.removed_at, clock_timestamp(), clock_timestamp(),
           i.id <> ALL ($8::bigint[])
    FROM input i WHERE i.id NOT IN (SELECT id FROM done)
    ON CONFLICT (domain, list, address_key, tag) DO UPDATE SET done_at = excluded.done_at,
                                                              found = excluded.found
    WHERE x.done_at IS NOT NULL
), overtaken AS (
    -- An unfinished backfill's pages may list what Mailgun just deleted (see backfill_overtaken).
    UPDATE mailgun.backfill_progress SET overtaken = true WHERE domain = $2 AND list = $3
)
INSERT INTO mailgun.changes (run_id, domain, list, address, action, detail)
SELECT $1, $2, $3, address, 'delete', CASE WHEN tag <> '' THEN 'tag ' || tag END FROM input;

-- name: resend_after_removal
-- $1 domain, $2 addresses, $3 tags: after those DELETEs, a synced row the mirror holds again for
-- the address (a webhook newer than the application's removal wrote it while the DELETE was in
-- flight) may be one Mailgun just lost: it turns pending, so the push sends it back (an add is an
-- upsert at Mailgun) or the pull adopts it.
UPDATE {table} m SET sync_state = 'pending', sync_error = NULL
FROM unnest($2::text[], $3::text[]) AS r(address, tag)
WHERE m.domain = $1 AND m.{address_key} = lower(r.address COLLATE "C") COLLATE "default" AND m.sync_state = 'synced';

-- name: resend_after_removal@unsubscribes
-- As `resend_after_removal`; a tag removal counts only if the row has the tag again.
UPDATE {table} m SET sync_state = 'pending', sync_error = NULL
FROM unnest($2::text[], $3::text[]) AS r(address, tag)
WHERE m.domain = $1 AND m.{address_key} = lower(r.address COLLATE "C") COLLATE "default" AND m.sync_state = 'synced'
  AND (r.tag = '' OR r.tag = ANY (m.tags));

-- name: removal_failed
-- $1 removal id, $2 why
UPDATE mailgun.removals SET last_error = $2 WHERE id = $1;

-- name: webhook_write
-- $1 a JSON array of webhook events of this list, at most one per address (the writer puts a
-- repeat in a later round of the same transaction), each with its signature's token and time.
--   * Each token is recorded; an event whose token was seen before is a replay and writes nothing.
--   * An event no newer than a local removal of its address (queued or carried out), or older than
--     the application's last change of a pending row, is superseded: the application's removal or
--     change stands. A newer one means Mailgun suppressed the address again: a
--     queued removal not yet sent is cancelled and the row written (one in flight is carried out,
--     and the row is written pending, below).
--   * Rows are written synced (Mailgun has them), at the clock's time: a reconcile whose pull
--     started before neither updates nor removes them. A pending or rejected row is adopted.
--   * Unless Mailgun may have lost the record since: a DELETE of the address was in flight, or
--     found and deleted a record only after the event happened (within a minute, for the two
--     clocks). Then the row is written pending, and the next run adopts it or sends it back. A
--     DELETE answered "not found" took nothing.
--   * The statement decides on what its snapshot shows; another transaction committing a change of
--     the address after it was taken (an application's INSERT the insert below waits for and then
--     conflicts with, a DELETE, an UPDATE making the row pending the UPDATE below then skips)
--     leaves the event neither updated nor inserted: `moved`. The caller rolls the statement back
--     and runs it again, when its new snapshot shows the change.
-- Returns every token's outcome: stored, replay, superseded or moved.
WITH input AS (
    SELECT e.*, lower(e.address COLLATE "C") COLLATE "default" AS key
    FROM jsonb_to_recordset($1::jsonb) AS e(token text, signed_at timestamptz, domain text, address text,
                                            code text, error text, created_at timestamptz,
                                            occurred_at timestamptz, tags text[], event_id text,
                                            change_id uuid)
), fresh AS (
    INSERT INTO mailgun.webhook_tokens (token, signed_at)
    SELECT token, signed_at FROM input
    ON CONFLICT (token) DO NOTHING
    RETURNING token
), accepted AS (
    SELECT i.*,
           EXISTS (SELECT 1 FROM mailgun.removals x WHERE x.domain = i.domain AND x.list = '{list}'
                   AND x.address_key = i.key AND x.sent_at IS NOT NULL
                   AND (x.done_at IS NULL OR (x.found IS NOT FALSE
                                              AND x.done_at + interval '1 minute' >= i.occurred_at))) AS in_doubt
    FROM input i JOIN fresh USING (token)
    WHERE NOT EXISTS (SELECT 1 FROM mailgun.removals x WHERE x.domain = i.domain AND x.list = '{list}'
                      AND x.address_key = i.key AND x.removed_at >= i.occurred_at)
      AND NOT EXISTS (SELECT 1 FROM {table} m WHERE m.domain = i.domain AND m.address_key = i.key
                      AND m.sync_state = 'pending' AND m.updated_at > i.occurred_at)
), revived AS (
    DELETE FROM mailgun.removals x USING accepted r
    WHERE x.domain = r.domain AND x.list = '{list}' AND x.address_key = r.key AND x.done_at IS NULL
      AND x.sent_at IS NULL
), before AS (
    SELECT m.domain, m.address_key, m.sync_state
    FROM {table} m JOIN accepted r ON m.domain = r.domain AND m.address_key = r.key
), updated AS (
    UPDATE {table} m
    SET {set_cols}, sync_state = CASE WHEN r.in_doubt THEN 'pending' ELSE 'synced' END::mailgun.sync_state,
        sync_error = NULL, synced_at = clock_timestamp()
    FROM accepted r
    WHERE m.domain = r.domain AND m.address_key = r.key
      AND NOT (m.sync_state = 'pending' AND m.updated_at > r.occurred_at)
    RETURNING r.token, r.change_id, r.event_id, m.domain, m.address, m.address_key, m.sync_state
), inserted AS (
    INSERT INTO {table} (domain, address, {cols}, sync_state, synced_at)
    SELECT r.domain, r.address, {r_cols},
           CASE WHEN r.in_doubt THEN 'pending' ELSE 'synced' END::mailgun.sync_state, clock_timestamp()
    FROM accepted r
    WHERE NOT EXISTS (SELECT 1 FROM before b WHERE b.domain = r.domain AND b.address_key = r.key)
    ON CONFLICT (domain, address_key) DO NOTHING
    RETURNING domain, address, address_key
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action, detail, source)
    SELECT u.change_id, u.domain, '{list}', u.address,
           CASE WHEN b.sync_state <> 'synced' AND u.sync_state = 'synced' THEN 'synced' ELSE 'update' END,
           u.event_id, 'webhook'
    FROM updated u JOIN before b ON b.domain = u.domain AND b.address_key = u.address_key
    UNION ALL
    SELECT r.change_id, n.domain, '{list}', n.address, 'insert', r.event_id, 'webhook'
    FROM inserted n JOIN accepted r ON r.domain = n.domain AND r.key = n.address_key
), written AS (
    SELECT token FROM updated
    UNION ALL
    SELECT r.token FROM inserted n JOIN accepted r ON r.domain = n.domain AND r.key = n.address_key
)
SELECT i.token,
       CASE WHEN f.token IS NULL THEN 'replay' WHEN a.token IS NULL THEN 'superseded'
            WHEN w.token IS NULL THEN 'moved' ELSE 'stored' END AS outcome
FROM input i LEFT JOIN fresh f USING (token) LEFT JOIN accepted a USING (token)
    LEFT JOIN written w USING (token);

-- name: webhook_write@unsubscribes
-- As `webhook_write`, but tags are a set: a synced or pending row takes the union, and a pending
-- row stays pending (to be pushed) when it holds tags the event did not bring; a rejected row
-- takes the event's tags. Of the queued removals, only the whole record's and those of the
-- event's tags are weighed against it: the application's drop of another tag stands.
WITH input AS (
    SELECT e.*, lower(e.address COLLATE "C") COLLATE "default" AS key
    FROM jsonb_to_recordset($1::jsonb) AS e(token text, signed_at timestamptz, domain text, address text,
                                            code text, error text, created_at timestamptz,
                                            occurred_at timestamptz, tags text[], event_id text,
                                            change_id uuid)
), fresh AS (
    INSERT INTO mailgun.webhook_tokens (token, signed_at)
    SELECT token, signed_at FROM input
    ON CONFLICT (token) DO NOTHING
    RETURNING token
), accepted AS (
    SELECT i.*,
           EXISTS (SELECT 1 FROM mailgun.removals x WHERE x.domain = i.domain AND x.list = '{list}'
                   AND x.address_key = i.key AND x.sent_at IS NOT NULL
                   AND (x.done_at IS NULL OR (x.found IS NOT FALSE
                                              AND x.done_at + interval '1 minute' >= i.occurred_at))
                   AND (x.tag = '' OR x.tag = ANY (i.tags))) AS in_doubt
    FROM input i JOIN fresh USING (token)
    WHERE NOT EXISTS (SELECT 1 FROM mailgun.removals x WHERE x.domain = i.domain AND x.list = '{list}'
                      AND x.address_key = i.key AND x.removed_at >= i.occurred_at
                      AND (x.tag = '' OR x.tag = ANY (i.tags)))
      AND NOT EXISTS (SELECT 1 FROM {table} m WHERE m.domain = i.domain AND m.address_key = i.key
                      AND m.sync_state = 'pending' AND m.updated_at > i.occurred_at)
), revived AS (
    DELETE FROM mailgun.removals x USING accepted r
    WHERE x.domain = r.domain AND x.list = '{list}' AND x.address_key = r.key AND x.done_at IS NULL
      AND x.sent_at IS NULL
      AND (x.tag = '' OR x.tag = ANY (r.tags))
), before AS (
    SELECT m.domain, m.address_key, m.sync_state
    FROM {table} m JOIN accepted r ON m.domain = r.domain AND m.address_key = r.key
), updated AS (
    UPDATE {table} m
    SET tags = CASE WHEN m.sync_state = 'rejected' THEN r.tags
                    ELSE (SELECT array_agg(DISTINCT t COLLATE "C" ORDER BY t COLLATE "C") FROM unnest(m.tags || r.tags) AS t) END,
        created_at = r.created_at,
        sync_state = CASE WHEN r.in_doubt OR (m.sync_state = 'pending' AND NOT r.tags @> m.tags)
                          THEN 'pending' ELSE 'synced' END::mailgun.sync_state,
        sync_error = NULL,
        synced_at = CASE WHEN m.sync_state = 'pending' AND NOT r.tags @> m.tags THEN m.synced_at
                         ELSE clock_timestamp() END
    FROM accepted r
    WHERE m.domain = r.domain AND m.address_key = r.key
      AND NOT (m.sync_state = 'pending' AND m.updated_at > r.occurred_at)
    RETURNING r.token, r.change_id, r.event_id, m.domain, m.address, m.address_key, m.sync_state
), inserted AS (
    INSERT INTO {table} (domain, address, {cols}, sync_state, synced_at)
    SELECT r.domain, r.address, {r_cols},
           CASE WHEN r.in_doubt THEN 'pending' ELSE 'synced' END::mailgun.sync_state, clock_timestamp()
    FROM accepted r
    WHERE NOT EXISTS (SELECT 1 FROM before b WHERE b.domain = r.domain AND b.address_key = r.key)
    ON CONFLICT (domain, address_key) DO NOTHING
    RETURNING domain, address, address_key
), logged AS (
    INSERT INTO mailgun.changes (run_id, domain, list, address, action, detail, source)
    SELECT u.change_id, u.domain, '{list}', u.address,
           CASE WHEN b.sync_state <> 'synced' AND u.sync_state = 'synced' THEN 'synced' ELSE 'update' END,
           u.event_id, 'webhook'
    FROM updated u JOIN before b ON b.domain = u.domain AND b.address_key = u.address_key
    UNION ALL
    SELECT r.change_id, n.domain, '{list}', n.address, 'insert', r.event_id, 'webhook'
    FROM inserted n JOIN accepted r ON r.domain = n.domain AND r.key = n.address_key
), written AS (
    SELECT token FROM updated
    UNION ALL
    SELECT r.token FROM inserted n JOIN accepted r ON r.domain = n.domain AND r.key = n.address_key
)
SELECT i.token,
       CASE WHEN f.token IS NULL THEN 'replay' WHEN a.token IS NULL THEN 'superseded'
            WHEN w.token IS NULL THEN 'moved' ELSE 'stored' END AS outcome
FROM input i LEFT JOIN fresh f USING (token) LEFT JOIN accepted a USING (token)
    LEFT JOIN written w USING (token);

-- name: webhook_use_tokens
-- $1 tokens, $2 their signature times: signed deliveries that write nothing else (ignored, or
-- refused as never storable). Each token is used up all the same, in the transaction that decides
-- its delivery's outcome: the signature does not cover event-data, so a replay carrying other data
-- must be a replay. Returns the tokens not seen before.
INSERT INTO mailgun.webhook_tokens (token, signed_at)
SELECT * FROM unnest($1::text[], $2::timestamptz[])
ON CONFLICT (token) DO NOTHING
RETURNING token;

-- name: webhook_statement_allowance
-- $1 milliseconds. The webhook pool's sessions end any statement after the time a batch has
-- (statement_timeout); pruning, rare and bounded on its own, gets longer for this transaction.
SELECT set_config('statement_timeout', $1, true);

-- name: webhook_prune_tokens
-- $1 the oldest signature time still accepted: a replay of an older token fails that check anyway.
DELETE FROM mailgun.webhook_tokens WHERE signed_at < $1;

-- name: discovery_listed
-- $1 api_base, $2 the enabled domains of a complete listing.
INSERT INTO mailgun.discovered_domains (api_base, domains, listed_at, checked_at, error)
VALUES ($1, $2, now(), now(), NULL)
ON CONFLICT (api_base) DO UPDATE SET domains = EXCLUDED.domains, listed_at = now(), checked_at = now(),
                                     error = NULL;

-- name: discovery_failed
-- $1 api_base, $2 why the listing failed; the domains of the last complete listing stay.
INSERT INTO mailgun.discovered_domains (api_base, checked_at, error) VALUES ($1, now(), $2)
ON CONFLICT (api_base) DO UPDATE SET checked_at = now(), error = EXCLUDED.error;

-- name: discovery_state
SELECT api_base, domains, listed_at, checked_at, error FROM mailgun.discovered_domains ORDER BY api_base;

-- name: list_health
-- Each list's last success and its runs in a row not ending ok, for the daemon's gauges.
SELECT domain, list, last_ok_at, failures_in_a_row FROM mailgun.last_runs;

-- name: retention_cutoff
-- $1 days: rows older than this moment, by the database's clock, are past the retention.
SELECT clock_timestamp() - make_interval(days => $1);

-- name: try_lock_retention
-- Session-level, in a key space of its own: one process prunes at a time, the others skip.
SELECT pg_try_advisory_lock(hashtext('mailgun-sync:retention'), 0);

-- name: unlock_retention
SELECT pg_advisory_unlock(hashtext('mailgun-sync:retention'), 0);

-- Every prune_* query deletes one batch of a table's rows past the retention, oldest first, and
-- is run in a transaction of its own: $1 the cutoff, $2 and $3 the (time, id) the previous batch
-- stopped at, $4 the batch size. It returns how many rows past the cutoff the batch looked at
-- (fewer than $4: the last batch) and how many it deleted, and the (time, id) of the last row it
-- looked at, where the next batch starts. Rows are found through an index on
-- (time, id) and deleted by primary key, so a batch costs the same at the start of a table of
-- millions as at its end.

-- name: prune_changes
WITH candidates AS (
    SELECT id, at FROM mailgun.changes
    WHERE at < $1 AND (at, id) > ($2, $3)
    ORDER BY at, id LIMIT $4
), gone AS (
    DELETE FROM mailgun.changes WHERE id = ANY (ARRAY(SELECT id FROM candidates)) RETURNING 1
), last AS (
    SELECT at, id FROM candidates ORDER BY at DESC, id DESC LIMIT 1
)
SELECT (SELECT count(*) FROM candidates) AS found, (SELECT count(*) FROM gone) AS removed,
       (SELECT at FROM last) AS last_at, (SELECT id FROM last) AS last_id;

-- name: prune_done_removals
-- Removals carried out at Mailgun, kept to judge late webhooks and leftover spellings: never before
-- the longest WEBHOOK_MAX_AGE (30 days) has passed, or a webhook about an older event, delivered
-- late, could bring the address back.
WITH candidates AS (
    SELECT id, done_at AS at FROM mailgun.removals
    WHERE done_at < least($1, now() - interval '30 days') AND (done_at, id) > ($2, $3)
    ORDER BY done_at, id LIMIT $4
), gone AS (
    DELETE FROM mailgun.removals WHERE id = ANY (ARRAY(SELECT id FROM candidates)) RETURNING 1
), last AS (
    SELECT at, id FROM candidates ORDER BY at DESC, id DESC LIMIT 1
)
SELECT (SELECT count(*) FROM candidates) AS found, (SELECT count(*) FROM gone) AS removed,
       (SELECT at FROM last) AS last_at, (SELECT id FROM last) AS last_id;

-- name: prune_sync_runs
-- The newest run of each (domain, list) and status stays whatever its age: `status` and the
-- metrics read a list's last run, and its last `ok` one says when it last succeeded. That newest
-- time is looked up once per (domain, list, status) of the batch, not once per row.
WITH candidates AS (
    SELECT id, finished_at AS at, domain, list, status FROM mailgun.sync_runs
    WHERE finished_at < $1 AND (finished_at, id) > ($2, $3)
    ORDER BY finished_at, id LIMIT $4
), newest AS MATERIALIZED (
    SELECT g.domain, g.list, g.status,
           (SELECT max(n.finished_at) FROM mailgun.sync_runs n
            WHERE n.domain = g.domain AND n.list = g.list AND n.status = g.status) AS at
    FROM (SELECT DISTINCT domain, list, status FROM candidates) AS g
), gone AS (
    DELETE FROM mailgun.sync_runs
    WHERE id = ANY (ARRAY(SELECT c.id FROM candidates c JOIN newest n USING (domain, list, status)
                          WHERE c.at < n.at))
    RETURNING 1
), last AS (
    SELECT at, id FROM candidates ORDER BY at DESC, id DESC LIMIT 1
)
SELECT (SELECT count(*) FROM candidates) AS found, (SELECT count(*) FROM gone) AS removed,
       (SELECT at FROM last) AS last_at, (SELECT id FROM last) AS last_id;

-- name: plan_lists
-- $1 domains, $2 lists, $3 schedules, $4 leases (seconds), $5 seconds from now to the first due
-- time (the database's clock). A list new to the schedule, or planned on another schedule than
-- before, is due at its first due time (or when it was due, if sooner), its interval's grid
-- anchored there; a known one keeps its due time, so a replica's start or refresh does not move
-- what another replica scheduled. Rows are taken in (domain, list) order, as every statement here
-- that locks several does, so that two of them never wait for each other.
INSERT INTO mailgun.schedule AS s (domain, list, due_at, anchor_at, schedule, lease_s, planned_at)
SELECT p.domain, p.list, now() + make_interval(secs => p.first_in),
       now() + make_interval(secs => p.first_in), p.schedule, p.lease_s, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::float8[])
     AS p(domain, list, schedule, lease_s, first_in)
ORDER BY p.domain, p.list
ON CONFLICT (domain, list) DO UPDATE
SET planned_at = now(), lease_s = excluded.lease_s, schedule = excluded.schedule,
    due_at = CASE WHEN s.schedule = excluded.schedule THEN s.due_at
                  ELSE LEAST(s.due_at, excluded.due_at) END,
    anchor_at = CASE WHEN s.schedule = excluded.schedule THEN s.anchor_at
                     ELSE excluded.anchor_at END;

-- name: claim_due_lists
-- $1 replica, $2 at most this many, $3 the domains it syncs. The lists of those domains that are
-- due, longest due first, each moved a lease ahead so that no other replica takes it while this
-- one runs it. Lists of other domains (a replica with another configuration, in a rolling update;
-- a domain no replica syncs any more) are left to the replicas that sync them, or alone. Rows
-- another replica is claiming at this moment are passed over, not waited for. Also returns the
-- server's time of the claim, from which the replica counts, whatever its own clock says.
UPDATE mailgun.schedule s
SET due_at = now() + make_interval(secs => s.lease_s), claimed_by = $1, claimed_at = now()
FROM (SELECT domain, list FROM mailgun.schedule
      WHERE due_at <= now() AND domain = ANY ($3::text[])
      ORDER BY due_at
      LIMIT $2
      FOR UPDATE SKIP LOCKED) AS due
WHERE s.domain = due.domain AND s.list = due.list
RETURNING s.domain, s.list, s.anchor_at, s.lease_s, now() AS claimed_at;

-- name: renew_claims
-- $1 replica, $2 domains, $3 lists: this replica's runs in progress keep their claims a lease
-- longer. A claim another replica has taken since (this one's ran out) stays theirs.
UPDATE mailgun.schedule s
SET due_at = now() + make_interval(secs => s.lease_s)
FROM (SELECT h.domain, h.list FROM mailgun.schedule h
      JOIN unnest($2::text[], $3::text[]) AS r(domain, list) USING (domain, list)
      WHERE h.claimed_by = $1
      ORDER BY h.domain, h.list
      FOR UPDATE OF h) AS held
WHERE s.domain = held.domain AND s.list = held.list;

-- name: schedule_next
-- $1 domain, $2 list, $3 next due time, $4 the schedule it was computed on: the run that a claim
-- started has ended. A list planned on another schedule since (a rolling update) is due a lease
-- of that schedule from now instead, for a replica on that schedule to run and schedule.
UPDATE mailgun.schedule
SET due_at = CASE WHEN schedule = $4 THEN $3 ELSE now() + make_interval(secs => lease_s) END,
    claimed_by = NULL
WHERE domain = $1 AND list = $2;

-- name: release_lists
-- $1 domains, $2 lists, $3 seconds from now: claims given back unrun (a replica stopping), for
-- another replica to take after that long.
UPDATE mailgun.schedule s
SET due_at = now() + make_interval(secs => $3), claimed_by = NULL
FROM (SELECT h.domain, h.list FROM mailgun.schedule h
      JOIN unnest($1::text[], $2::text[]) AS r(domain, list) USING (domain, list)
      ORDER BY h.domain, h.list
      FOR UPDATE OF h) AS given
WHERE s.domain = given.domain AND s.list = given.list;
