-- A backfill's committed pages and its cursor, so an interrupted backfill (SIGKILL included)
-- continues from its last committed page. Both tables are UNLOGGED: fast to fill, and if a
-- PostgreSQL crash empties them it empties both together, so a backfill then simply starts over.

CREATE UNLOGGED TABLE mailgun.backfill_pages (
    domain      text NOT NULL,
    list        text NOT NULL,
    key         text,
    address     text NOT NULL,
    code        text,
    error       text,
    created_at  text,
    tags        text[]
);
CREATE INDEX backfill_pages_list ON mailgun.backfill_pages (domain, list);

CREATE UNLOGGED TABLE mailgun.backfill_progress (
    domain       text NOT NULL,
    list         text NOT NULL,
    last_address text NOT NULL,
    pages        bigint NOT NULL,
    records      bigint NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (domain, list)
);
