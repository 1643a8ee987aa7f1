"""Mailgun's signed webhooks into the mirror: `endpoint` serves POST /webhooks/mailgun and answers
each delivery; `events` verifies a delivery and reads its event into a mirror row (no I/O);
`writer` writes the events in group-committed batches; `selftest` is the `webhook-test` command,
which signs sample deliveries as Mailgun would and checks an endpoint's answers."""
