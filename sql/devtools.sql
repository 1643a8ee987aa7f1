-- Named queries of the tooling (worker/devtools): the demo, the benchmarks, the soak and scratch
-- databases; loaded once by worker/devtools/sql.py, as sql/queries.sql is by worker/sql.py.
-- Values are always $n parameters; {database} is a name the caller generated.

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

-- name: bench_prepare_mirror
-- $1 domain, $2 N: the benchmark's mirror against Mailgun's synthetic list of N bounces
-- (worker/emulator/synthetic.py): every record but 1 in 100 (those Mailgun has alone), plus N/100
-- synced rows Mailgun no longer has, plus $3 pending local additions.
INSERT INTO mailgun.bounces (domain, address, code, error, created_at, sync_state, synced_at)
SELECT $1, format('user%s@example.com', lpad(i::text, 8, '0')), '550', '5.1.1 mailbox unavailable',
       '2026-03-02 10:00:00+00'::timestamptz, 'synced'::mailgun.sync_state, now() - interval '1 hour'
FROM generate_series(0, $2 - 1) AS i WHERE i % 100 <> 0
UNION ALL
SELECT $1, format('user%s@example.com', lpad(i::text, 8, '0')), '550', 'gone from Mailgun',
       '2026-03-01 10:00:00+00'::timestamptz, 'synced'::mailgun.sync_state, now() - interval '1 hour'
FROM generate_series($2, $2 + $2 / 100 - 1) AS i
UNION ALL
SELECT $1, format('local%s@example.com', lpad(i::text, 8, '0')), '550', 'bounced elsewhere',
       '2026-03-03 10:00:00+00'::timestamptz, 'pending'::mailgun.sync_state, NULL
FROM generate_series(0, $3 - 1) AS i;

-- name: bench_delete_locally
-- $1 domain, $2 N: the application deletes N synced rows that Mailgun has (its triggers queue their
-- removals at Mailgun).
DELETE FROM mailgun.bounces
WHERE domain = $1 AND address IN (SELECT format('user%s@example.com', lpad(i::text, 8, '0'))
                                  FROM generate_series(1, $2 + $2 / 99) AS i WHERE i % 100 <> 0
                                  LIMIT $2);

-- name: bench_reset_mirror
TRUNCATE mailgun.bounces, mailgun.changes, mailgun.sync_runs, mailgun.removals;

-- name: bench_vacuum
VACUUM ANALYZE mailgun.bounces;

-- name: baseline_upsert
-- $1 domain, $2 address, $3 code, $4 error, $5 created_at: what a hand-written sync does per record.
INSERT INTO mailgun.bounces (domain, address, code, error, created_at, sync_state, synced_at)
VALUES ($1, $2, $3, $4, $5::text::timestamptz, 'synced', now())
ON CONFLICT (domain, address_key) DO UPDATE
SET code = excluded.code, error = excluded.error, created_at = excluded.created_at,
    sync_state = 'synced', synced_at = now();

-- name: baseline_synced_addresses
SELECT address FROM mailgun.bounces WHERE domain = $1 AND sync_state = 'synced';

-- name: baseline_delete
DELETE FROM mailgun.bounces WHERE domain = $1 AND address = $2;

-- name: baseline_pending
SELECT address, code, error FROM mailgun.bounces WHERE domain = $1 AND sync_state = 'pending';

-- name: baseline_mark_synced
UPDATE mailgun.bounces SET sync_state = 'synced', synced_at = now() WHERE domain = $1 AND address = $2;

-- name: server_version
SHOW server_version;

-- name: create_database
-- {database}: a name the caller generated ([a-z0-9_]); throwaway databases for benchmarks and tests.
CREATE DATABASE "{database}";

-- name: icu_databases_supported
-- Whether this server can create a database that sorts text by ICU's en-US rules, as many managed
-- servers do by default (PostgreSQL 15 or later, built with ICU).
SELECT current_setting('server_version_num')::int >= 150000
       AND EXISTS (SELECT 1 FROM pg_collation WHERE collprovider = 'i' AND collname = 'en-US-x-icu');

-- name: create_database_icu
-- {database} as for create_database, but its default collation is ICU's en-US instead of C: for
-- tests that the mirror behaves the same whatever the database's collation.
CREATE DATABASE "{database}" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US';

-- name: drop_database
DROP DATABASE IF EXISTS "{database}" WITH (FORCE);

-- name: soak_local_addition
-- $1 domain, $2 a counter: one more pending local addition.
INSERT INTO mailgun.bounces (domain, address) VALUES ($1, format('soak-local%s@example.com', lpad($2::int::text, 6, '0')));

-- name: soak_mirror
SELECT address FROM mailgun.bounces WHERE domain = $1 AND sync_state = 'synced';

-- name: soak_pending
SELECT count(*) FROM mailgun.bounces WHERE domain = $1 AND sync_state = 'pending';

-- name: soak_runs_by_status
SELECT status, count(*) AS n FROM mailgun.sync_runs GROUP BY status;

-- name: bench_webhook_rows
-- $1: LIKE patterns of the webhooks' addresses (a run's pull may have added others).
SELECT (SELECT count(*) FROM mailgun.bounces WHERE address_key LIKE ANY ($1))
     + (SELECT count(*) FROM mailgun.complaints WHERE address_key LIKE ANY ($1))
     + (SELECT count(*) FROM mailgun.unsubscribes WHERE address_key LIKE ANY ($1));

-- name: bench_prune_fill_changes
-- $1 old rows, $2 fresh rows: a change log as webhooks leave it, in time order with one change id
-- each: $1 rows from 61 to 31 days old (past a 30-day retention), then $2 of the last 29 days.
INSERT INTO mailgun.changes (run_id, domain, list, address, action, detail, source, at)
SELECT md5(i::text)::uuid, 'mg.bench.example', 'bounces', format('user%s@example.com', i), 'insert',
       'bench', 'webhook',
       CASE WHEN i < $1::bigint THEN now() - interval '61 days' + i * (interval '30 days' / greatest($1::bigint, 1))
            ELSE now() - interval '29 days' + (i - $1::bigint) * (interval '29 days' / greatest($2::bigint, 1)) END
FROM generate_series(0, $1::bigint + $2::bigint - 1) AS i;

-- name: bench_prune_fill_runs
-- $1 runs of 25 domains' 4 lists over the last 61 days, oldest first.
INSERT INTO mailgun.sync_runs (run_id, domain, list, status, started_at, finished_at)
SELECT md5('run' || i)::uuid, format('mg%s.bench.example', i % 25),
       (ARRAY['bounces', 'unsubscribes', 'complaints', 'allowlist'])[1 + i / 25 % 4], 'ok', t.at, t.at
FROM generate_series(0, $1::bigint - 1) AS i,
     LATERAL (SELECT now() - interval '61 days' + i * (interval '61 days' / greatest($1::bigint, 1)) AS at) AS t;

-- name: bench_prune_drop_indexes
-- The retention migration's indexes, dropped so that the benchmark can time building them.
DROP INDEX mailgun.changes_at, mailgun.sync_runs_finished, mailgun.sync_runs_latest_by_status;

-- name: bench_prune_vacuum
VACUUM ANALYZE mailgun.changes, mailgun.sync_runs;

-- name: bench_checkpoint
-- Written out before measuring, so that the fill's checkpoint does not land in the measurement
-- (needs a superuser or pg_checkpoint; skipped without).
CHECKPOINT;

-- name: bench_prune_write
-- $1 change id, $2 address: one webhook's change row, committed on its own.
INSERT INTO mailgun.changes (run_id, domain, list, address, action, detail, source)
VALUES ($1, 'mg.bench.example', 'complaints', $2, 'insert', 'bench-writer', 'webhook');

-- name: bench_prune_left
-- $1 the retention's cutoff: what the benchmark's pruning left.
SELECT count(*) FILTER (WHERE at < $1) AS old,
       count(*) FILTER (WHERE at >= $1 AND detail = 'bench') AS fresh,
       count(*) FILTER (WHERE detail = 'bench-writer') AS written
FROM mailgun.changes;

-- name: bench_lists_due_now
-- Every list on the daemons' shared schedule is due now.
UPDATE mailgun.schedule SET due_at = now(), claimed_by = NULL;

-- name: server_now
SELECT now();

-- name: bench_run_starts
-- When each list's runs began, in order.
SELECT domain, list, started_at FROM mailgun.sync_runs ORDER BY domain, list, started_at;
