-- A row's domain and address (an allowlist entry's value) are its identity at Mailgun. Changed by
-- an UPDATE on a row Mailgun may hold (synced, or sent and not refused), the old record would stay
-- at Mailgun with no removal queued, and the next pull would bring it back as a row of its own.
-- Such an UPDATE is refused, saying how to do it: DELETE the row (its removal is queued) and INSERT
-- the new one. A row Mailgun does not hold (never sent, or refused: a rejected address being
-- corrected) may change them, and any row the spelling of its address (its case), which is the
-- same address to Mailgun.
CREATE FUNCTION mailgun.refuse_address_change() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
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
    IF (lower(was COLLATE "C") IS DISTINCT FROM lower(now_is COLLATE "C") OR NEW.domain IS DISTINCT FROM OLD.domain)
       AND (OLD.sync_state = 'synced' OR OLD.synced_at IS NOT NULL
            OR (OLD.sent_at IS NOT NULL AND OLD.sync_state <> 'rejected')) THEN
        RAISE EXCEPTION 'mailgun.%: the domain and address of a row Mailgun may hold cannot be changed',
                        TG_TABLE_NAME
            USING ERRCODE = 'check_violation',
                  HINT = 'DELETE the row and INSERT the new one: the old record is then deleted at Mailgun';
    END IF;
    RETURN NEW;
END;
$$;
REVOKE EXECUTE ON FUNCTION mailgun.refuse_address_change() FROM PUBLIC;

CREATE TRIGGER bounces_address_is_identity BEFORE UPDATE OF address, domain ON mailgun.bounces FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.refuse_address_change();
CREATE TRIGGER unsubscribes_address_is_identity BEFORE UPDATE OF address, domain ON mailgun.unsubscribes FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.refuse_address_change();
CREATE TRIGGER complaints_address_is_identity BEFORE UPDATE OF address, domain ON mailgun.complaints FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.refuse_address_change();
CREATE TRIGGER allowlist_address_is_identity BEFORE UPDATE OF value, domain ON mailgun.allowlist FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.refuse_address_change();
