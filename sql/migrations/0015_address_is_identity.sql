-- A row's domain and address (an allowlist entry's value) are its identity at Mailgun. Changed by
-- an UPDATE on a row Mailgun may hold (synced, or sent), the old record would stay at Mailgun with
-- no removal queued, and the next pull would bring it back as a row of its own.
--   * A row Mailgun may hold and has not refused: such an UPDATE is refused, saying how to do it:
--     DELETE the row (its removal is queued) and INSERT the new one.
--   * A row sent and refused (rejected: an address being corrected): the change is taken, and the
--     old record's removal is queued, as a DELETE of the row would queue it. Mailgun normally does
--     not hold it (the DELETE is answered "not found"), unless an earlier try of the refused
--     request was stored after all.
--   * A row never sent, and any row's spelling of its address (its case, the same address to
--     Mailgun): taken.
-- Like the other triggers that queue removals, it runs as the schema's owner (see 0011).
CREATE FUNCTION mailgun.guard_identity() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    was text;
    now_is text;
BEGIN
    IF TG_TABLE_NAME = 'allowlist' THEN
        was := OLD.value;
        now_is := NEW.value;
    ELSE
        was := OLD.address;
        now_is := NEW.address;
    END IF;
    IF lower(was COLLATE "C") IS NOT DISTINCT FROM lower(now_is COLLATE "C")
       AND NEW.domain IS NOT DISTINCT FROM OLD.domain THEN
        RETURN NEW;
    END IF;
    IF OLD.sync_state = 'synced' OR OLD.synced_at IS NOT NULL
       OR (OLD.sent_at IS NOT NULL AND OLD.sync_state <> 'rejected') THEN
        RAISE EXCEPTION 'mailgun.%: the domain and address of a row Mailgun may hold cannot be changed',
                        TG_TABLE_NAME
            USING ERRCODE = 'check_violation',
                  HINT = 'DELETE the row and INSERT the new one: the old record is then deleted at Mailgun';
    END IF;
    IF OLD.sent_at IS NOT NULL THEN
        INSERT INTO mailgun.removals AS x (domain, list, address) VALUES (OLD.domain, TG_ARGV[0], was)
        ON CONFLICT (domain, list, address_key, tag) DO UPDATE
        SET address = excluded.address, removed_at = clock_timestamp(), sent_at = NULL, done_at = NULL,
            last_error = NULL
        WHERE x.done_at IS NOT NULL;
        NEW.sent_at := NULL;  -- the new record has not been sent
    END IF;
    RETURN NEW;
END;
$$;
REVOKE EXECUTE ON FUNCTION mailgun.guard_identity() FROM PUBLIC;

CREATE TRIGGER bounces_identity BEFORE UPDATE OF address, domain ON mailgun.bounces FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.guard_identity('bounces');
CREATE TRIGGER unsubscribes_identity BEFORE UPDATE OF address, domain ON mailgun.unsubscribes FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.guard_identity('unsubscribes');
CREATE TRIGGER complaints_identity BEFORE UPDATE OF address, domain ON mailgun.complaints FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.guard_identity('complaints');
CREATE TRIGGER allowlist_identity BEFORE UPDATE OF value, domain ON mailgun.allowlist FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.guard_identity('allowlist');
