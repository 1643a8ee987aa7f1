-- The allowlist (Mailgun's `whitelists`): addresses and whole domains that bounces never suppress.
-- An application adds an entry with a plain INSERT of (domain, value[, type, reason]), as for the
-- other lists; `type` says whether `value` is an address or a domain.
--
-- Also: an application that drops tags from an unsubscribe has Mailgun drop them too.

CREATE TABLE mailgun.allowlist (
    domain      text NOT NULL,
    type        text NOT NULL DEFAULT 'address' CHECK (type IN ('address', 'domain')),
    value       text NOT NULL CHECK (length(value) BETWEEN 1 AND 512),
    value_key   text NOT NULL GENERATED ALWAYS AS (lower(value COLLATE "C")) STORED,
    reason      text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    sync_state  mailgun.sync_state NOT NULL DEFAULT 'pending',
    sync_error  text,
    synced_at   timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX allowlist_domain_value_key ON mailgun.allowlist (domain, value_key);
CREATE INDEX allowlist_pending ON mailgun.allowlist (domain, value_key) WHERE sync_state = 'pending';

-- As in 0001, but a stored key is not computed yet in a BEFORE trigger, so `value_key` (like
-- `address_key`) is left out of the comparison.
CREATE OR REPLACE FUNCTION mailgun.note_local_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('mailgun_sync.writer', true), '') = 'worker' THEN
        RETURN NEW;
    END IF;
    NEW.updated_at := now();
    IF NEW.sync_state = OLD.sync_state
       AND (to_jsonb(NEW) - 'address_key' - 'value_key' - 'updated_at' - 'sync_state' - 'sync_error'
            - 'synced_at')
           IS DISTINCT FROM
           (to_jsonb(OLD) - 'address_key' - 'value_key' - 'updated_at' - 'sync_state' - 'sync_error'
            - 'synced_at')
    THEN
        NEW.sync_state := 'pending';
        NEW.sync_error := NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER allowlist_local_change BEFORE UPDATE ON mailgun.allowlist
    FOR EACH ROW EXECUTE FUNCTION mailgun.note_local_change();

-- A queued removal is a whole record (tag '') or one unsubscribe tag.
ALTER TABLE mailgun.removals ADD COLUMN tag text NOT NULL DEFAULT '';
DROP INDEX mailgun.removals_domain_list_key;
CREATE UNIQUE INDEX removals_domain_list_key_tag ON mailgun.removals (domain, list, address_key, tag);

-- The removal triggers of 0003, taught the allowlist's `value`. Each branch is planned only when
-- it runs, so a table without the other column never trips over it. A row Mailgun confirmed once
-- (synced_at is set) and changed locally since is pending again, but Mailgun still has it: its
-- removal is queued too. Only a row Mailgun never had just disappears (its push is cancelled).
CREATE OR REPLACE FUNCTION mailgun.note_local_removal() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    removed text;
BEGIN
    IF coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker'
       AND (OLD.sync_state = 'synced' OR OLD.synced_at IS NOT NULL) THEN
        IF TG_TABLE_NAME = 'allowlist' THEN
            removed := OLD.value;
        ELSE
            removed := OLD.address;
        END IF;
        INSERT INTO mailgun.removals (domain, list, address) VALUES (OLD.domain, TG_ARGV[0], removed)
        ON CONFLICT (domain, list, address_key, tag) DO NOTHING;
        IF TG_TABLE_NAME = 'unsubscribes' THEN
            -- Its tags too: an unsubscribe added again with fewer tags before the run cancels the
            -- whole removal and those of its tags, and the others are still dropped at Mailgun.
            -- While the whole removal stands, the run sends it alone.
            INSERT INTO mailgun.removals (domain, list, address, tag)
            SELECT OLD.domain, TG_ARGV[0], OLD.address, dropped FROM unnest(OLD.tags) AS dropped
            ON CONFLICT (domain, list, address_key, tag) DO NOTHING;
        END IF;
    END IF;
    RETURN OLD;
END;
$$;

-- Adding an address again cancels its queued removal, and the removal of any tag it is added with.
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
    WHERE domain = NEW.domain AND list = TG_ARGV[0] AND address_key = lower(added COLLATE "C")
      AND (tag = '' OR tag = ANY (tags));
    RETURN NEW;
END;
$$;

-- An application's UPDATE that drops tags from an unsubscribe Mailgun has had (synced_at is set)
-- queues the removal of each dropped tag (Mailgun removes one tag per request); putting a tag back
-- cancels it. The row itself turns pending (mailgun.note_local_change), and the run, which sends
-- the removals before it pulls, then adopts it.
CREATE FUNCTION mailgun.note_tag_removal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('mailgun_sync.writer', true), '') = 'worker'
       OR OLD.sync_state = 'rejected' OR OLD.synced_at IS NULL THEN
        RETURN NEW;
    END IF;
    DELETE FROM mailgun.removals
    WHERE domain = NEW.domain AND list = 'unsubscribes' AND address_key = NEW.address_key
      AND tag = ANY (NEW.tags);
    INSERT INTO mailgun.removals (domain, list, address, tag)
    SELECT NEW.domain, 'unsubscribes', NEW.address, dropped
    FROM unnest(OLD.tags) AS dropped
    WHERE dropped <> ALL (NEW.tags)
    ON CONFLICT (domain, list, address_key, tag) DO NOTHING;
    RETURN NEW;
END;
$$;

CREATE TRIGGER unsubscribes_tags_dropped AFTER UPDATE OF tags ON mailgun.unsubscribes
    FOR EACH ROW WHEN (OLD.tags IS DISTINCT FROM NEW.tags)
    EXECUTE FUNCTION mailgun.note_tag_removal();

CREATE TRIGGER allowlist_local_removal AFTER DELETE ON mailgun.allowlist
    FOR EACH ROW EXECUTE FUNCTION mailgun.note_local_removal('allowlist');
CREATE TRIGGER allowlist_readded AFTER INSERT ON mailgun.allowlist
    FOR EACH ROW EXECUTE FUNCTION mailgun.cancel_local_removal('allowlist');
