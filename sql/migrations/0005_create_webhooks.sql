-- Mailgun webhooks: each delivery's token, to ignore replays, and the source of every change.
--
-- A token is kept as long as a delivery signed with it would still pass the timestamp check
-- (WEBHOOK_MAX_AGE); past that, a replay fails that check anyway, so the token is pruned. The
-- table is shared by every replica, and a token is recorded in the transaction that stores its
-- event, so a failed store does not use it up.

CREATE TABLE mailgun.webhook_tokens (
    token     text PRIMARY KEY CHECK (length(token) BETWEEN 1 AND 512),
    signed_at timestamptz NOT NULL
);
CREATE INDEX webhook_tokens_signed_at ON mailgun.webhook_tokens (signed_at);

-- Which side wrote a change: a reconcile (the run's id) or a webhook (an id per delivery; the
-- detail holds Mailgun's event id).
ALTER TABLE mailgun.changes ADD COLUMN source text NOT NULL DEFAULT 'reconcile'
    CHECK (source IN ('reconcile', 'webhook'));
