"""mailgun-sync: keeps Mailgun's suppression lists and a PostgreSQL mirror in step."""

__version__ = "0.1.0"
