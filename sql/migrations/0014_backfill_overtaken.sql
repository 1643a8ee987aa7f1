-- A run that removes rows from a list marks that list's unfinished backfill, in the statement
-- that removes them: the backfill's saved pages may list those records, and a run killed before
-- it recorded itself in mailgun.sync_runs leaves no other trace of having removed them.

ALTER TABLE mailgun.backfill_progress ADD COLUMN overtaken boolean NOT NULL DEFAULT false;
