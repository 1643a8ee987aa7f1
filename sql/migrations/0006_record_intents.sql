-- What the worker is about to do at Mailgun is written down before the request leaves, so that an
-- application write, a webhook or a crash landing while a request is in flight cannot make the
-- mirror forget what Mailgun may hold.

-- When the worker last sent a row to Mailgun: from then on Mailgun may hold it, even if its
-- answer never came back. An application's DELETE of such a row, pending or not, is carried out at
-- Mailgun like the removal of a synced row.
ALTER TABLE mailgun.bounces ADD COLUMN sent_at timestamptz;
ALTER TABLE mailgun.unsubscribes ADD COLUMN sent_at timestamptz;
ALTER TABLE mailgun.complaints ADD COLUMN sent_at timestamptz;
ALTER TABLE mailgun.allowlist ADD COLUMN sent_at timestamptz;

-- A removal is queued (done_at NULL), in flight (sent_at set), or carried out (done_at set). A
-- carried-out removal is kept: a webhook for an event older than the removal, or newer than it but
-- older than the DELETE that carried it out, is judged against it, and so is a record the pull
-- still finds under another spelling. They are pruned with the run history.
ALTER TABLE mailgun.removals ADD COLUMN sent_at timestamptz, ADD COLUMN done_at timestamptz;
-- When the DELETE statement ran, not when its transaction began: a webhook about an event in
-- between is older than the removal.
ALTER TABLE mailgun.removals ALTER COLUMN removed_at SET DEFAULT clock_timestamp();
CREATE INDEX removals_queued ON mailgun.removals (domain, list, id) WHERE done_at IS NULL;

-- As in 0004, for rows Mailgun may hold because they were sent, and reusing a carried-out removal
-- of the same address (the application may delete an address again after adding it back).
CREATE OR REPLACE FUNCTION mailgun.note_local_removal() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    removed text;
BEGIN
    IF coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker'
       AND (OLD.sync_state = 'synced' OR OLD.synced_at IS NOT NULL OR OLD.sent_at IS NOT NULL) THEN
        IF TG_TABLE_NAME = 'allowlist' THEN
            removed := OLD.value;
        ELSE
            removed := OLD.address;
        END IF;
        INSERT INTO mailgun.removals AS x (domain, list, address) VALUES (OLD.domain, TG_ARGV[0], removed)
        ON CONFLICT (domain, list, address_key, tag) DO UPDATE
        SET address = excluded.address, removed_at = clock_timestamp(), sent_at = NULL, done_at = NULL,
            last_error = NULL
        WHERE x.done_at IS NOT NULL;
        IF TG_TABLE_NAME = 'unsubscribes' THEN
            -- Its tags too: an unsubscribe added again with fewer tags before the run cancels the
            -- whole removal and those of its tags, and the others are still dropped at Mailgun.
            -- While the whole removal stands, the run sends it alone.
            INSERT INTO mailgun.removals AS x (domain, list, address, tag)
            SELECT OLD.domain, TG_ARGV[0], OLD.address, dropped FROM unnest(OLD.tags) AS dropped
            ON CONFLICT (domain, list, address_key, tag) DO UPDATE
            SET address = excluded.address, removed_at = clock_timestamp(), sent_at = NULL, done_at = NULL,
                last_error = NULL
            WHERE x.done_at IS NOT NULL;
        END IF;
    END IF;
    RETURN OLD;
END;
$$;

-- As in 0004: adding an address again cancels its queued removal and the removal of any tag it is
-- added with. Carried-out removals stay on record, and so do removals whose DELETE is in flight:
-- they are carried out all the same, and the row added again is then sent back by the push.
CREATE OR REPLACE FUNCTION mailgun.cancel_local_removal() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    added text;
    tags text[] := '{}';
BEGIN
    IF coalesce(current_setting('mailgun_sync.writer', true), '') = 'worker' THEN
        RETURN NEW;
    END IF;
    IF TG_TABLE_NAME = 'allowlist' THEN
        added := NEW.value;
    ELSIF TG_TABLE_NAME = 'unsubscribes' THEN
        added := NEW.address;
        tags := NEW.tags;
    ELSE
        added := NEW.address;
    END IF;
    DELETE FROM mailgun.removals
    WHERE domain = NEW.domain AND list = TG_ARGV[0] AND address_key = lower(added COLLATE "C") COLLATE "default"
      AND (tag = '' OR tag = ANY (tags)) AND done_at IS NULL AND sent_at IS NULL;
    RETURN NEW;
END;
$$;

-- As in 0004, also for an unsubscribe that was sent but not yet confirmed.
CREATE OR REPLACE FUNCTION mailgun.note_tag_removal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('mailgun_sync.writer', true), '') = 'worker'
       OR OLD.sync_state = 'rejected' OR (OLD.synced_at IS NULL AND OLD.sent_at IS NULL) THEN
        RETURN NEW;
    END IF;
    DELETE FROM mailgun.removals
    WHERE domain = NEW.domain AND list = 'unsubscribes' AND address_key = NEW.address_key
      AND tag = ANY (NEW.tags) AND done_at IS NULL AND sent_at IS NULL;
    INSERT INTO mailgun.removals AS x (domain, list, address, tag)
    SELECT NEW.domain, 'unsubscribes', NEW.address, dropped
    FROM unnest(OLD.tags) AS dropped
    WHERE dropped <> ALL (NEW.tags)
    ON CONFLICT (domain, list, address_key, tag) DO UPDATE
    SET address = excluded.address, removed_at = clock_timestamp(), sent_at = NULL, done_at = NULL,
        last_error = NULL
    WHERE x.done_at IS NOT NULL;
    RETURN NEW;
END;
$$;

-- An address added again while its removal is still queued is one Mailgun holds (the removal was
-- never carried out): the new row is marked so, and deleting it again queues the removal again.
CREATE FUNCTION mailgun.note_held_when_readded() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    added text;
BEGIN
    IF coalesce(current_setting('mailgun_sync.writer', true), '') = 'worker' THEN
        RETURN NEW;
    END IF;
    IF TG_TABLE_NAME = 'allowlist' THEN
        added := NEW.value;
    ELSE
        added := NEW.address;
    END IF;
    IF EXISTS (SELECT 1 FROM mailgun.removals
               WHERE domain = NEW.domain AND list = TG_ARGV[0] AND tag = '' AND done_at IS NULL
                 AND address_key = lower(added COLLATE "C") COLLATE "default") THEN
        NEW.sent_at := coalesce(NEW.sent_at, clock_timestamp());
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER bounces_readded_held BEFORE INSERT ON mailgun.bounces
    FOR EACH ROW EXECUTE FUNCTION mailgun.note_held_when_readded('bounces');
CREATE TRIGGER unsubscribes_readded_held BEFORE INSERT ON mailgun.unsubscribes
    FOR EACH ROW EXECUTE FUNCTION mailgun.note_held_when_readded('unsubscribes');
CREATE TRIGGER complaints_readded_held BEFORE INSERT ON mailgun.complaints
    FOR EACH ROW EXECUTE FUNCTION mailgun.note_held_when_readded('complaints');
CREATE TRIGGER allowlist_readded_held BEFORE INSERT ON mailgun.allowlist
    FOR EACH ROW EXECUTE FUNCTION mailgun.note_held_when_readded('allowlist');
