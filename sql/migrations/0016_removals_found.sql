-- Whether a carried-out removal's DELETE found the record at Mailgun (its 2xx) or not (Mailgun's own
-- "not found"). A DELETE that found nothing cannot have taken a newer record Mailgun was given
-- meanwhile, so a webhook about that record is not in doubt (webhook_write, resend_after_removal).
-- NULL: recorded before this column, and taken as found.
ALTER TABLE mailgun.removals ADD COLUMN found boolean;
