-- The mirror of Mailgun's suppression lists, the worker's run records and its change log.
--
-- Applications read these tables like any other, and add a suppression with a plain INSERT of
-- (domain, address[, code, error | tags]): the bookkeeping columns default to a pending local
-- addition, which the next run pushes to Mailgun.

-- Schema `mailgun` itself exists by now: migrate creates it with its own bookkeeping table.

CREATE TYPE mailgun.sync_state AS ENUM ('pending', 'synced', 'rejected');

CREATE TABLE mailgun.bounces (
    domain      text NOT NULL,
    address     text NOT NULL CHECK (length(address) BETWEEN 1 AND 512),
    address_key text NOT NULL GENERATED ALWAYS AS (lower(address COLLATE "C")) STORED,
    code        text NOT NULL DEFAULT '550',
    error       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    sync_state  mailgun.sync_state NOT NULL DEFAULT 'pending',
    sync_error  text,
    synced_at   timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE mailgun.unsubscribes (
    domain      text NOT NULL,
    address     text NOT NULL CHECK (length(address) BETWEEN 1 AND 512),
    address_key text NOT NULL GENERATED ALWAYS AS (lower(address COLLATE "C")) STORED,
    tags        text[] NOT NULL DEFAULT '{*}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    sync_state  mailgun.sync_state NOT NULL DEFAULT 'pending',
    sync_error  text,
    synced_at   timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE mailgun.complaints (
    domain      text NOT NULL,
    address     text NOT NULL CHECK (length(address) BETWEEN 1 AND 512),
    address_key text NOT NULL GENERATED ALWAYS AS (lower(address COLLATE "C")) STORED,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sync_state  mailgun.sync_state NOT NULL DEFAULT 'pending',
    sync_error  text,
    synced_at   timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per address and domain, whatever its case: Mailgun's case rules are undocumented, and
-- an address differing only by case is the same mailbox for every provider that matters. The key
-- is stored so that diffing a million rows compares plain text. It folds ASCII letters only
-- (COLLATE "C"), so it is the same in every database whatever its collation (a Turkish one folds
-- "I" to a dotless "ı") and the worker can compute it too.
CREATE UNIQUE INDEX bounces_domain_address_key ON mailgun.bounces (domain, address_key);
CREATE UNIQUE INDEX unsubscribes_domain_address_key ON mailgun.unsubscribes (domain, address_key);
CREATE UNIQUE INDEX complaints_domain_address_key ON mailgun.complaints (domain, address_key);

CREATE INDEX bounces_pending ON mailgun.bounces (domain, address_key) WHERE sync_state = 'pending';
CREATE INDEX unsubscribes_pending ON mailgun.unsubscribes (domain, address_key) WHERE sync_state = 'pending';
CREATE INDEX complaints_pending ON mailgun.complaints (domain, address_key) WHERE sync_state = 'pending';

-- An application's change to a row's data makes it a local change again (pending), so a row that
-- Mailgun or local validation refused is retried once corrected. The worker marks its own writes
-- with the transaction-local setting mailgun_sync.writer = 'worker', which this trigger leaves alone.
CREATE FUNCTION mailgun.note_local_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('mailgun_sync.writer', true), '') = 'worker' THEN
        RETURN NEW;
    END IF;
    NEW.updated_at := now();
    IF NEW.sync_state = OLD.sync_state
       AND (to_jsonb(NEW) - 'address_key' - 'updated_at' - 'sync_state' - 'sync_error' - 'synced_at')
           IS DISTINCT FROM
           (to_jsonb(OLD) - 'address_key' - 'updated_at' - 'sync_state' - 'sync_error' - 'synced_at')
    THEN
        NEW.sync_state := 'pending';
        NEW.sync_error := NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER bounces_local_change BEFORE UPDATE ON mailgun.bounces
    FOR EACH ROW EXECUTE FUNCTION mailgun.note_local_change();
CREATE TRIGGER unsubscribes_local_change BEFORE UPDATE ON mailgun.unsubscribes
    FOR EACH ROW EXECUTE FUNCTION mailgun.note_local_change();
CREATE TRIGGER complaints_local_change BEFORE UPDATE ON mailgun.complaints
    FOR EACH ROW EXECUTE FUNCTION mailgun.note_local_change();

-- One row per (run, domain, list).
CREATE TABLE mailgun.sync_runs (
    id          bigserial PRIMARY KEY,
    run_id      uuid NOT NULL,
    domain      text NOT NULL,
    list        text NOT NULL,
    status      text NOT NULL CHECK (status IN ('ok', 'skipped', 'failed', 'guarded')),
    dry_run     boolean NOT NULL DEFAULT false,
    pulled      bigint NOT NULL DEFAULT 0,
    inserted    bigint NOT NULL DEFAULT 0,
    updated     bigint NOT NULL DEFAULT 0,
    removed     bigint NOT NULL DEFAULT 0,
    adopted     bigint NOT NULL DEFAULT 0,
    pushed      bigint NOT NULL DEFAULT 0,
    rejected    bigint NOT NULL DEFAULT 0,
    error       text,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    UNIQUE (run_id, domain, list)
);
CREATE INDEX sync_runs_latest ON mailgun.sync_runs (domain, list, finished_at DESC);

-- What each run changed, on which side: insert/update/remove in the mirror (from Mailgun),
-- push (sent to Mailgun and confirmed), reject (refused locally or by Mailgun), synced (a pending
-- row Mailgun already had).
CREATE TABLE mailgun.changes (
    id          bigserial PRIMARY KEY,
    run_id      uuid NOT NULL,
    domain      text NOT NULL,
    list        text NOT NULL,
    address     text NOT NULL CHECK (length(address) BETWEEN 1 AND 512),
    address_key text NOT NULL GENERATED ALWAYS AS (lower(address COLLATE "C")) STORED,
    action      text NOT NULL CHECK (action IN ('insert', 'update', 'remove', 'push', 'reject', 'synced')),
    detail      text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX changes_by_run ON mailgun.changes (run_id);
CREATE INDEX changes_by_address ON mailgun.changes (domain, lower(address));

-- Unsubscribe tags are a set: kept sorted and distinct, `*` (all mail) when none is given, so
-- that comparing two rows compares their sets.
CREATE FUNCTION mailgun.normalise_tags() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker' THEN
        NEW.tags := coalesce(
            (SELECT array_agg(DISTINCT t ORDER BY t) FROM unnest(NEW.tags) AS t WHERE t <> ''),
            '{*}');
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER unsubscribes_tag_set BEFORE INSERT OR UPDATE OF tags ON mailgun.unsubscribes
    FOR EACH ROW EXECUTE FUNCTION mailgun.normalise_tags();
