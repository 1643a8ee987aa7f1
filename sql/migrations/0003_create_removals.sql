-- Local removals: an application removes a suppression with a plain DELETE from a mirror table.
-- A synced row removed that way is remembered here, and the next run deletes it at Mailgun and
-- then forgets it (after Mailgun's 2xx, or a 404: Mailgun no longer had it). Removing a pending
-- row just cancels its push; adding the address again before the run cancels the removal.

CREATE TABLE mailgun.removals (
    id          bigserial PRIMARY KEY,
    domain      text NOT NULL,
    list        text NOT NULL,
    address     text NOT NULL,
    address_key text NOT NULL GENERATED ALWAYS AS (lower(address COLLATE "C")) STORED,
    removed_at  timestamptz NOT NULL DEFAULT now(),
    last_error  text
);
CREATE UNIQUE INDEX removals_domain_list_key ON mailgun.removals (domain, list, address_key);

CREATE FUNCTION mailgun.note_local_removal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker'
       AND OLD.sync_state = 'synced' THEN
        INSERT INTO mailgun.removals (domain, list, address) VALUES (OLD.domain, TG_ARGV[0], OLD.address)
        ON CONFLICT (domain, list, address_key) DO NOTHING;
    END IF;
    RETURN OLD;
END;
$$;

CREATE FUNCTION mailgun.cancel_local_removal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('mailgun_sync.writer', true), '') = 'worker' THEN
        RETURN NEW;
    END IF;
    DELETE FROM mailgun.removals
    WHERE domain = NEW.domain AND list = TG_ARGV[0] AND address_key = lower(NEW.address COLLATE "C");
    RETURN NEW;
END;
$$;

CREATE TRIGGER bounces_local_removal AFTER DELETE ON mailgun.bounces
    FOR EACH ROW EXECUTE FUNCTION mailgun.note_local_removal('bounces');
CREATE TRIGGER unsubscribes_local_removal AFTER DELETE ON mailgun.unsubscribes
    FOR EACH ROW EXECUTE FUNCTION mailgun.note_local_removal('unsubscribes');
CREATE TRIGGER complaints_local_removal AFTER DELETE ON mailgun.complaints
    FOR EACH ROW EXECUTE FUNCTION mailgun.note_local_removal('complaints');

CREATE TRIGGER bounces_readded AFTER INSERT ON mailgun.bounces
    FOR EACH ROW EXECUTE FUNCTION mailgun.cancel_local_removal('bounces');
CREATE TRIGGER unsubscribes_readded AFTER INSERT ON mailgun.unsubscribes
    FOR EACH ROW EXECUTE FUNCTION mailgun.cancel_local_removal('unsubscribes');
CREATE TRIGGER complaints_readded AFTER INSERT ON mailgun.complaints
    FOR EACH ROW EXECUTE FUNCTION mailgun.cancel_local_removal('complaints');

ALTER TABLE mailgun.sync_runs ADD COLUMN deleted bigint NOT NULL DEFAULT 0;
ALTER TABLE mailgun.changes DROP CONSTRAINT changes_action_check;
ALTER TABLE mailgun.changes ADD CONSTRAINT changes_action_check
    CHECK (action IN ('insert', 'update', 'remove', 'push', 'reject', 'synced', 'delete'));
