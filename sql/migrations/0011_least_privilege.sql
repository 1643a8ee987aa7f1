-- Least privilege (sql/roles.sql, `mailgun-sync grants`): applications may write the lists but
-- not mailgun.removals, which the worker acts on at Mailgun. The triggers that queue, cancel and
-- look up removals when an application writes a list therefore run as the schema's owner
-- (SECURITY DEFINER) instead of as the application. Each names its tables with their schema, and
-- its search_path is fixed to the system catalog (temporary objects last), so that nothing an
-- application may create can stand in for a function or operator they call.
--
-- A later migration that replaces one of these functions (CREATE OR REPLACE) must say SECURITY
-- DEFINER and SET search_path again: a replacement takes only the attributes it names.
ALTER FUNCTION mailgun.note_local_removal() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION mailgun.cancel_local_removal() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION mailgun.note_tag_removal() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION mailgun.note_held_when_readded() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Trigger functions cannot be called directly anyway, and firing a trigger needs no EXECUTE
-- right: nobody but their owner needs one.
REVOKE EXECUTE ON FUNCTION mailgun.note_local_removal(), mailgun.cancel_local_removal(),
    mailgun.note_tag_removal(), mailgun.note_held_when_readded(), mailgun.note_local_change(),
    mailgun.normalise_tags() FROM PUBLIC;

-- Switching to the owner and back costs each call about as much as the function's own work, and
-- the worker's writes (a pull inserting a million rows) fire these triggers too, only for the
-- functions to return at once. The triggers now skip the worker's writes in their WHEN condition,
-- before any function is called (and an AFTER trigger's event is not even queued): the functions
-- keep their own check, so each is correct either way. Same names, so BEFORE triggers still fire
-- in the same (alphabetical) order.
DROP TRIGGER bounces_local_removal ON mailgun.bounces;
DROP TRIGGER unsubscribes_local_removal ON mailgun.unsubscribes;
DROP TRIGGER complaints_local_removal ON mailgun.complaints;
DROP TRIGGER allowlist_local_removal ON mailgun.allowlist;
CREATE TRIGGER bounces_local_removal AFTER DELETE ON mailgun.bounces FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.note_local_removal('bounces');
CREATE TRIGGER unsubscribes_local_removal AFTER DELETE ON mailgun.unsubscribes FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.note_local_removal('unsubscribes');
CREATE TRIGGER complaints_local_removal AFTER DELETE ON mailgun.complaints FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.note_local_removal('complaints');
CREATE TRIGGER allowlist_local_removal AFTER DELETE ON mailgun.allowlist FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.note_local_removal('allowlist');

DROP TRIGGER bounces_readded ON mailgun.bounces;
DROP TRIGGER unsubscribes_readded ON mailgun.unsubscribes;
DROP TRIGGER complaints_readded ON mailgun.complaints;
DROP TRIGGER allowlist_readded ON mailgun.allowlist;
CREATE TRIGGER bounces_readded AFTER INSERT ON mailgun.bounces FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.cancel_local_removal('bounces');
CREATE TRIGGER unsubscribes_readded AFTER INSERT ON mailgun.unsubscribes FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.cancel_local_removal('unsubscribes');
CREATE TRIGGER complaints_readded AFTER INSERT ON mailgun.complaints FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.cancel_local_removal('complaints');
CREATE TRIGGER allowlist_readded AFTER INSERT ON mailgun.allowlist FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.cancel_local_removal('allowlist');

DROP TRIGGER bounces_readded_held ON mailgun.bounces;
DROP TRIGGER unsubscribes_readded_held ON mailgun.unsubscribes;
DROP TRIGGER complaints_readded_held ON mailgun.complaints;
DROP TRIGGER allowlist_readded_held ON mailgun.allowlist;
CREATE TRIGGER bounces_readded_held BEFORE INSERT ON mailgun.bounces FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.note_held_when_readded('bounces');
CREATE TRIGGER unsubscribes_readded_held BEFORE INSERT ON mailgun.unsubscribes FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.note_held_when_readded('unsubscribes');
CREATE TRIGGER complaints_readded_held BEFORE INSERT ON mailgun.complaints FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.note_held_when_readded('complaints');
CREATE TRIGGER allowlist_readded_held BEFORE INSERT ON mailgun.allowlist FOR EACH ROW
    WHEN (coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.note_held_when_readded('allowlist');

DROP TRIGGER unsubscribes_tags_dropped ON mailgun.unsubscribes;
CREATE TRIGGER unsubscribes_tags_dropped AFTER UPDATE OF tags ON mailgun.unsubscribes FOR EACH ROW
    WHEN (OLD.tags IS DISTINCT FROM NEW.tags
          AND coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker')
    EXECUTE FUNCTION mailgun.note_tag_removal();
