"""Settings: read from the environment, flags win, and every problem names its setting."""

from __future__ import annotations

import pytest

from worker.errors import ConfigError
from worker.settings import Settings

BASE = {"MAILGUN_API_KEY": "key-secret-value"}


def test_defaults_fill_everything_but_the_key():
    settings = Settings.from_env(BASE)
    assert settings.api_base == "https://api.mailgun.net"
    assert (settings.max_attempts, settings.backoff_max, settings.max_delete_fraction) == (6, 60.0, 0.10)


def test_flags_override_the_environment():
    settings = Settings.from_env({**BASE, "MAILGUN_MAX_ATTEMPTS": "3"}, MAILGUN_MAX_ATTEMPTS=9)
    assert settings.max_attempts == 9


def test_domains_are_a_comma_separated_list():
    settings = Settings.from_env({**BASE, "MAILGUN_DOMAINS": " mg.a.com, mg.b.org ,"})
    assert settings.domains == ("mg.a.com", "mg.b.org")


def test_the_key_never_appears_in_the_repr():
    settings = Settings.from_env({**BASE, "DATABASE_URL": "postgresql://u:dbpass@h/db",
                                  "MAILGUN_WEBHOOK_SIGNING_KEY": "whk-secret-value"})
    assert settings.webhook_signing_key == "whk-secret-value"
    assert "key-secret-value" not in repr(settings)
    assert "dbpass" not in repr(settings)
    assert "whk-secret-value" not in repr(settings)


def test_webhooks_are_off_without_a_signing_key_and_the_window_is_a_day():
    settings = Settings.from_env(BASE)
    assert (settings.webhook_signing_key, settings.webhook_max_age) == (None, 86400.0)
    assert Settings.from_env({**BASE, "WEBHOOK_MAX_AGE": "3600"}).webhook_max_age == 3600.0


def test_change_log_and_runs_are_kept_30_days_by_default_and_0_keeps_them_forever():
    assert Settings.from_env(BASE).retention_days == 30
    assert Settings.from_env({**BASE, "SYNC_RETENTION_DAYS": "0"}).retention_days == 0
    assert Settings.from_env(BASE, SYNC_RETENTION_DAYS=90).retention_days == 90


@pytest.mark.parametrize(("env", "setting"), [
    ({}, "MAILGUN_API_KEY"),
    ({"MAILGUN_API_KEY": "  "}, "MAILGUN_API_KEY"),
    ({**BASE, "MAILGUN_MAX_ATTEMPTS": "many"}, "MAILGUN_MAX_ATTEMPTS"),
    ({**BASE, "MAILGUN_MAX_ATTEMPTS": "0"}, "MAILGUN_MAX_ATTEMPTS"),
    ({**BASE, "MAILGUN_BACKOFF_MAX": "-1"}, "MAILGUN_BACKOFF_MAX"),
    ({**BASE, "MAILGUN_BACKOFF_MAX": "nan"}, "MAILGUN_BACKOFF_MAX"),
    ({**BASE, "MAILGUN_BACKOFF_MAX": "0"}, "MAILGUN_BACKOFF_MAX"),
    ({**BASE, "SYNC_MAX_DELETE_FRACTION": "1.5"}, "SYNC_MAX_DELETE_FRACTION"),
    ({**BASE, "MAILGUN_DOMAINS": "not a domain"}, "MAILGUN_DOMAINS"),
    ({**BASE, "MAILGUN_API_BASE": "ftp://api.mailgun.net"}, "MAILGUN_API_BASE"),
    ({**BASE, "MAILGUN_API_BASE": "http://api.mailgun.net"}, "MAILGUN_API_BASE"),
    ({**BASE, "MAILGUN_API_BASE": "https://api:key@api.mailgun.net"}, "MAILGUN_API_BASE"),
    ({**BASE, "MAILGUN_API_BASE": "https://api.mailgun.net/v3/mg.a.com/bounces"}, "MAILGUN_API_BASE"),
    ({**BASE, "WEBHOOK_MAX_AGE": "10"}, "WEBHOOK_MAX_AGE"),
    ({**BASE, "WEBHOOK_MAX_AGE": "inf"}, "WEBHOOK_MAX_AGE"),
    ({**BASE, "SYNC_RETENTION_DAYS": "-1"}, "SYNC_RETENTION_DAYS"),
    ({**BASE, "SYNC_RETENTION_DAYS": "a month"}, "SYNC_RETENTION_DAYS"),
])
def test_a_missing_or_malformed_setting_is_named(env, setting):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.setting == setting
    assert str(caught.value).startswith(f"{setting}: ")
    assert "key-secret-value" not in str(caught.value)


@pytest.mark.parametrize(("given", "origin"), [
    ("https://api.eu.mailgun.net/", "https://api.eu.mailgun.net"),
    ("https://api.mailgun.net/v3", "https://api.mailgun.net"),
    ("http://127.0.0.1:8025", "http://127.0.0.1:8025"),
    ("http://localhost:8025", "http://localhost:8025"),
    ("http://[::1]:8025", "http://[::1]:8025"),
])
def test_api_base_is_reduced_to_an_origin_and_http_only_for_loopback(given, origin):
    assert Settings.from_env({**BASE, "MAILGUN_API_BASE": given}).api_base == origin
