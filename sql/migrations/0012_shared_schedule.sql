-- When each list is due, shared by every daemon replica on this database, so that a list is
-- reconciled once per interval however many replicas run. A replica claims the lists that are due
-- (passing over rows another replica is claiming at that moment), which moves their due time a
-- lease ahead; it runs them, and sets each list's next due time when its run ends. A replica that
-- dies leaves its claims to run out: within a lease, another replica takes the list.

CREATE TABLE mailgun.schedule (
    domain     text NOT NULL,
    list       text NOT NULL,
    due_at     timestamptz NOT NULL,
    -- An interval schedule's grid starts here, so whichever replica computes the next due time
    -- computes the same one.
    anchor_at  timestamptz NOT NULL,
    -- The schedule the list was planned on (an interval or a crontab, as the replica read it): a
    -- list whose schedule changed is due again as a new one is.
    schedule   text NOT NULL,
    -- How long a claim stands unrenewed before another replica may take the list.
    lease_s    double precision NOT NULL CHECK (lease_s > 0),
    claimed_by text,                     -- the replica of the last claim; NULL once a run ended
    claimed_at timestamptz,
    -- The last time a replica planned this list; lists no replica plans any more are left alone.
    planned_at timestamptz NOT NULL,
    PRIMARY KEY (domain, list)
);

CREATE INDEX schedule_due ON mailgun.schedule (due_at);
