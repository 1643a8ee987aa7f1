-- Unsubscribe tags in code-point order (COLLATE "C"), whatever the database's default collation.
--
-- The worker sorts Mailgun's tags by code point, and the mirror compares tag arrays element by
-- element. Sorted by a linguistic collation instead (ICU's en-US puts `_x` before `a` before `B`),
-- a row whose tags the database had sorted (an application's write, a webhook, an adoption) looked
-- changed to the next run, which wrote it again and logged an update Mailgun never made.

CREATE OR REPLACE FUNCTION mailgun.normalise_tags() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('mailgun_sync.writer', true), '') <> 'worker' THEN
        NEW.tags := coalesce(
            (SELECT array_agg(DISTINCT t COLLATE "C" ORDER BY t COLLATE "C")
             FROM unnest(NEW.tags) AS t WHERE t <> ''),
            '{*}');
    END IF;
    RETURN NEW;
END;
$$;

-- BEFORE triggers fire in the order of their names: renamed, this one runs before
-- unsubscribes_local_change, which then compares the normalised set with the stored one, so an
-- application that writes back the same tags in another order has changed nothing.
ALTER TRIGGER unsubscribes_tag_set ON mailgun.unsubscribes RENAME TO unsubscribes_canonical_tags;

-- Rows written before may hold their tags in the database's order. Re-sorted as the worker's
-- writes (the mirror's triggers leave them alone): only the order changes, not the set, so no row
-- turns pending and no tag removal is queued.
SELECT set_config('mailgun_sync.writer', 'worker', true);
UPDATE mailgun.unsubscribes
SET tags = (SELECT array_agg(DISTINCT t COLLATE "C" ORDER BY t COLLATE "C") FROM unnest(tags) AS t)
WHERE tags <> (SELECT array_agg(DISTINCT t COLLATE "C" ORDER BY t COLLATE "C") FROM unnest(tags) AS t);
SELECT set_config('mailgun_sync.writer', '', true);
