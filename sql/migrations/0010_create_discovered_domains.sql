-- The account's domains as last listed in each region (GET /v3/domains read to its end). A listing
-- that fails or comes back incomplete keeps the domains listed before it (across restarts too),
-- and `status` says which region's list is stale and why.

CREATE TABLE mailgun.discovered_domains (
    api_base   text PRIMARY KEY,
    domains    text[] NOT NULL DEFAULT '{}',  -- the enabled domains of the last complete listing
    listed_at  timestamptz,                   -- when that listing was read; NULL: never
    checked_at timestamptz NOT NULL,          -- the last attempt
    error      text                           -- why the last attempt failed; NULL: it succeeded
);
