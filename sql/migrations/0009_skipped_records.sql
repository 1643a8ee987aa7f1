-- Records Mailgun lists that the mirror cannot hold (an empty or overlong address, a NUL, an
-- unreadable date) are skipped, not a reason to fail the list: each run counts them, and a
-- backfill keeps a placeholder of each one whose address fits, so that the mirror's row of that
-- address is not taken as gone.

ALTER TABLE mailgun.sync_runs ADD COLUMN skipped bigint NOT NULL DEFAULT 0;

ALTER TABLE mailgun.backfill_pages ADD COLUMN skipped boolean NOT NULL DEFAULT false;
