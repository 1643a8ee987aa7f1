-- What `status` and a daemon's start read, in time that does not grow with the run log (20,000
-- lists run every 10 minutes add 86 million run records in 30 days).

-- The last recorded run of each (domain, list), as in mailgun.sync_runs, and when one last ended
-- ok. Written with each run record (record_run); pruning the run log leaves it alone.
CREATE TABLE mailgun.last_runs (
    domain      text NOT NULL,
    list        text NOT NULL,
    run_id      uuid NOT NULL,
    status      text NOT NULL,
    pulled      bigint NOT NULL,
    inserted    bigint NOT NULL,
    updated     bigint NOT NULL,
    removed     bigint NOT NULL,
    adopted     bigint NOT NULL,
    pushed      bigint NOT NULL,
    rejected    bigint NOT NULL,
    deleted     bigint NOT NULL,
    skipped     bigint NOT NULL,
    error       text,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    last_ok_at  timestamptz,
    -- Runs recorded in a row that did not end ok (failed or guarded), since the last ok one: what
    -- every replica exports, whichever of them ran the list.
    failures_in_a_row integer NOT NULL DEFAULT 0,
    PRIMARY KEY (domain, list)
);

INSERT INTO mailgun.last_runs
SELECT l.*, (SELECT count(*) FROM mailgun.sync_runs o
             WHERE o.domain = l.domain AND o.list = l.list AND o.status IN ('failed', 'guarded')
               AND o.finished_at > COALESCE(l.last_ok_at, '-infinity'))
FROM (SELECT DISTINCT ON (r.domain, r.list) r.domain, r.list, r.run_id, r.status, r.pulled,
             r.inserted, r.updated, r.removed, r.adopted, r.pushed, r.rejected, r.deleted,
             r.skipped, r.error, r.started_at, r.finished_at,
             (SELECT max(o.finished_at) FROM mailgun.sync_runs o
              WHERE o.domain = r.domain AND o.list = r.list AND o.status = 'ok') AS last_ok_at
      FROM mailgun.sync_runs r
      ORDER BY r.domain, r.list, r.finished_at DESC) AS l;

-- The rows Mailgun refused, by domain, as the pending rows already are: `status` counts both for
-- every list at once from the two partial indexes, without reading the synced rows (millions).
CREATE INDEX bounces_rejected ON mailgun.bounces (domain) WHERE sync_state = 'rejected';
CREATE INDEX unsubscribes_rejected ON mailgun.unsubscribes (domain) WHERE sync_state = 'rejected';
CREATE INDEX complaints_rejected ON mailgun.complaints (domain) WHERE sync_state = 'rejected';
CREATE INDEX allowlist_rejected ON mailgun.allowlist (domain) WHERE sync_state = 'rejected';
