"""Settings: read from the environment (secrets also from files), flags win, and every problem
names its setting and shows no secret."""

from __future__ import annotations

import os

import pytest

from worker.errors import ConfigError
from worker.settings import ENVIRONMENT, SECRETS, Settings, read_secret_file

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


def test_webhooks_and_probes_have_3_connections_of_their_own_by_default():
    assert Settings.from_env(BASE).webhook_pool_size == 3
    assert Settings.from_env({**BASE, "WEBHOOK_POOL_SIZE": "5"}).webhook_pool_size == 5


def test_webhooks_are_served_on_http_port_unless_webhook_port_is_set():
    assert (Settings.from_env(BASE).http_port, Settings.from_env(BASE).webhook_port) == (8080, None)
    assert Settings.from_env({**BASE, "WEBHOOK_PORT": "8081"}).webhook_port == 8081
    assert Settings.from_env(BASE, WEBHOOK_PORT=8443).webhook_port == 8443


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
    ({**BASE, "MAILGUN_API_BASE": "http://[::1"}, "MAILGUN_API_BASE"),  # urlsplit raises
    ({**BASE, "MAILGUN_API_BASE": "https://api.mailgun.net:99999"}, "MAILGUN_API_BASE"),
    ({**BASE, "WEBHOOK_MAX_AGE": "10"}, "WEBHOOK_MAX_AGE"),
    ({**BASE, "WEBHOOK_MAX_AGE": "inf"}, "WEBHOOK_MAX_AGE"),
    ({**BASE, "SYNC_RETENTION_DAYS": "-1"}, "SYNC_RETENTION_DAYS"),
    ({**BASE, "SYNC_RETENTION_DAYS": "a month"}, "SYNC_RETENTION_DAYS"),
    ({**BASE, "WEBHOOK_POOL_SIZE": "1"}, "WEBHOOK_POOL_SIZE"),
    ({**BASE, "WEBHOOK_POOL_SIZE": "many"}, "WEBHOOK_POOL_SIZE"),
    ({**BASE, "WEBHOOK_PORT": "http"}, "WEBHOOK_PORT"),
    ({**BASE, "WEBHOOK_PORT": "70000"}, "WEBHOOK_PORT"),
    ({**BASE, "WEBHOOK_PORT": "8080"}, "WEBHOOK_PORT"),  # HTTP_PORT's default
    ({**BASE, "HTTP_PORT": "9000", "WEBHOOK_PORT": "9000"}, "WEBHOOK_PORT"),
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


# ---- the database URL ----------------------------------------------------------------------------

WELL_FORMED_URLS = [
    "postgresql://postgres@127.0.0.1:5432/mirror",
    "postgres://app:s3cret!$&'()*+,;=:x@db.internal/app",  # what a password may hold unencoded
    "postgresql://app:p%2F%23%3F%40%25%20w@db.internal:5432/app?sslmode=verify-full",
    "postgresql://app@[::1]:5432,db2.internal:5433/app",
    "postgresql://postgres:@/postgres?host=/run/postgresql",
    "postgresql:///app",
]


@pytest.mark.parametrize("url", WELL_FORMED_URLS)
def test_a_well_formed_database_url_is_taken_as_given(url):
    assert Settings.from_env({**BASE, "DATABASE_URL": f" {url}\n"}).database_url == url


MALFORMED_URLS = [  # each password is Xk9...mZ2q, so that any piece of it shown is found
    "postgresql://app:Xk9/mZ2q@db.internal/app",
    "postgresql://app:Xk9#mZ2q@db.internal/app",
    "postgresql://app:Xk9?mZ2q@db.internal/app",
    "postgresql://app:Xk9@mZ2q@db.internal/app",
    "postgresql://app:Xk9%mZ2q@db.internal/app",
    "postgresql://app:Xk9 mZ2q@db.internal/app",
    "postgresql://app:Xk9\nmZ2q@db.internal/app",
    "postgresql://app:Xk9ümZ2q@db.internal/app",
    "postgresql://app:Xk9[mZ2q@db.internal/app",
    "postgresql://app:5432/Xk9mZ2q@db.internal",  # a / after digits: a port, then an @ in the path
    "postgresql://app:Xk9mZ2q@db.internal:99999/app",
    "postgresql://app:Xk9mZ2q@db.internal/app/Xk9mZ2q",
    "postgresql://app:Xk9mZ2q@db.internal/app#Xk9mZ2q",
    "postgresql://app:Xk9mZ2q@db.internal/app?Xk9mZ2q",
    "postgresql://app:Xk9mZ2q@[::Xk9]/app",
    "postgresql://app:Xk9mZ2q@h1,,h2/app",
    "mysql://app:Xk9mZ2q@db.internal/app",
    "app:Xk9mZ2q@db.internal/app",
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_a_malformed_database_url_is_refused_when_settings_are_read_showing_none_of_it(url):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "DATABASE_URL": url})
    message = str(caught.value)
    assert caught.value.setting == "DATABASE_URL"
    assert "\n" not in message
    assert "Xk9" not in message
    assert "mZ2" not in message
    assert "db.internal" not in message
    assert "postgresql://" in message  # the form it must have


# ---- secrets from files --------------------------------------------------------------------------

SECRET_VALUES = {"MAILGUN_API_KEY": "key-from-a-file", "DATABASE_URL": "postgresql://app:s3cret@db.internal/app",
                 "MAILGUN_WEBHOOK_SIGNING_KEY": "whk-from-a-file"}


def secrets_of(settings: Settings) -> dict[str, str | None]:
    return {"MAILGUN_API_KEY": settings.api_key, "DATABASE_URL": settings.database_url,
            "MAILGUN_WEBHOOK_SIGNING_KEY": settings.webhook_signing_key}


def test_every_secret_setting_has_a_file_variable():
    assert set(SECRETS) == set(SECRET_VALUES)
    assert {f"{name}_FILE" for name in SECRETS} <= set(ENVIRONMENT)


@pytest.mark.parametrize("name", SECRETS)
def test_a_secret_is_read_from_the_file_its_file_variable_names(tmp_path, name):
    path = tmp_path / name
    path.write_text(SECRET_VALUES[name] + "\n")  # as `echo` writes it
    env = {**{n: v for n, v in SECRET_VALUES.items() if n != name}, f"{name}_FILE": str(path)}
    assert secrets_of(Settings.from_env(env)) == SECRET_VALUES


@pytest.mark.parametrize(("written", "read"), [
    ("s3cret", "s3cret"), ("s3cret\n", "s3cret"), ("s3cret\r\n", "s3cret"), ("s3cret\n\n", "s3cret\n"),
    (" s3cret \n", " s3cret "),
])
def test_only_one_trailing_newline_is_taken_off_a_secret_file(tmp_path, written, read):
    path = tmp_path / "secret"
    path.write_bytes(written.encode())
    assert read_secret_file("MAILGUN_API_KEY_FILE", str(path)) == read


def test_a_flag_wins_over_a_secret_variable_and_its_file(tmp_path):
    path = tmp_path / "url"
    path.write_text("postgresql://from-the-file@db.internal/app")
    env = {**BASE, "DATABASE_URL": "postgresql://from-the-variable@db.internal/app",
           "DATABASE_URL_FILE": str(path)}
    settings = Settings.from_env(env, DATABASE_URL="postgresql://from-the-flag@db.internal/app")
    assert settings.database_url == "postgresql://from-the-flag@db.internal/app"


@pytest.mark.parametrize("name", SECRETS)
def test_a_secret_set_in_its_variable_and_in_its_file_is_refused(tmp_path, name):
    path = tmp_path / name
    path.write_text("from-the-file")
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**SECRET_VALUES, f"{name}_FILE": str(path)})
    assert caught.value.setting == name
    assert str(caught.value) == f"{name}: both {name} and {name}_FILE are set; set only one of them"


def unreadable(tmp_path):
    path = tmp_path / "unreadable"
    path.write_text("s3cret-contents")
    path.chmod(0)
    return path


BAD_FILES = [  # (make the file, what the error says after the path)
    pytest.param(lambda tmp_path: tmp_path / "missing", ": No such file or directory", id="missing"),
    pytest.param(lambda tmp_path: tmp_path, ": Is a directory", id="a directory"),
    pytest.param(unreadable, ": Permission denied", id="unreadable",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")),
    pytest.param(lambda tmp_path: write(tmp_path, b""), " is empty", id="empty"),
    pytest.param(lambda tmp_path: write(tmp_path, b"\n"), " is empty", id="a newline"),
    pytest.param(lambda tmp_path: write(tmp_path, b"  \t\n"), " is empty", id="blanks"),
    pytest.param(lambda tmp_path: write(tmp_path, b"s3cret-\xff-contents"), " is not UTF-8 text",
                 id="not UTF-8"),
    pytest.param(lambda tmp_path: write(tmp_path, b"s3cret-contents" * 5000), " is larger than 64 KiB; "
                 "it is not the file of a secret", id="too large"),
]


def write(tmp_path, data: bytes):
    path = tmp_path / "secret"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("make", "says"), BAD_FILES)
@pytest.mark.parametrize("name", SECRETS)
def test_a_missing_unreadable_or_empty_secret_file_is_named_with_its_path_never_its_contents(
        tmp_path, name, make, says):
    path = make(tmp_path)
    env = {**{n: v for n, v in SECRET_VALUES.items() if n != name}, f"{name}_FILE": str(path)}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.setting == f"{name}_FILE"
    assert str(caught.value).startswith(f"{name}_FILE: ")
    assert f"{path}{says}" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_a_secret_file_path_that_is_not_absolute_is_refused_without_showing_it():
    """A relative "path" may well be the secret itself, set in the wrong variable."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "MAILGUN_WEBHOOK_SIGNING_KEY_FILE": "whk-s3cret"})
    assert caught.value.setting == "MAILGUN_WEBHOOK_SIGNING_KEY_FILE"
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("name", ["MAILGUN_API_KEY", "MAILGUN_WEBHOOK_SIGNING_KEY"])
def test_a_secret_variable_that_is_not_utf8_is_refused_naming_it(name):
    """A byte that is not UTF-8 (here 0xff, as Python reads it from the environment) would fail
    only where the secret is first used: every request, or every webhook's check."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, name: "s3cret-\udcff-key"})
    assert caught.value.setting == name
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("argv", [["run"], ["daemon"]])
async def test_a_command_given_a_secret_that_is_not_utf8_stops_with_one_line_naming_it(invoke, argv):
    outcome = await invoke(*argv, env={**BASE, "MAILGUN_DOMAINS": "mg.example.com",
                                       "DATABASE_URL": "postgresql://app@127.0.0.1:9/app",
                                       "MAILGUN_WEBHOOK_SIGNING_KEY": "whk-s3cret-\udcff"})
    assert (outcome.code, outcome.out) == (2, "")
    [line] = outcome.err.splitlines()
    assert line.startswith("mailgun-sync: MAILGUN_WEBHOOK_SIGNING_KEY: ")


SECRET_FILE_PROBLEMS = [  # (command line, environment but for the file, the file's variable, what it
    # holds or None: no file, the setting the error names)
    (["run"], {"MAILGUN_DOMAINS": "mg.example.com"}, "MAILGUN_API_KEY_FILE", None, "MAILGUN_API_KEY_FILE"),
    (["daemon"], {**BASE, "MAILGUN_DOMAINS": "mg.example.com"}, "DATABASE_URL_FILE", b"",
     "DATABASE_URL_FILE"),
    (["migrate"], {}, "DATABASE_URL_FILE", b"\n", "DATABASE_URL_FILE"),
    (["status"], {"DATABASE_URL": "postgresql://app@db.internal/app"}, "DATABASE_URL_FILE", b"s3cret",
     "DATABASE_URL"),
    (["prune"], {}, "DATABASE_URL_FILE", b"postgresql://app:s3cret/@db.internal/app\n", "DATABASE_URL_FILE"),
    (["webhook-test", "--url", "http://127.0.0.1:9/webhooks/mailgun", "--domain", "mg.example.com"], {},
     "MAILGUN_WEBHOOK_SIGNING_KEY_FILE", b"\n", "MAILGUN_WEBHOOK_SIGNING_KEY_FILE"),
]


@pytest.mark.parametrize(("argv", "env", "variable", "contents", "setting"), SECRET_FILE_PROBLEMS,
                         ids=[f"{p[0][0]}-{p[2]}" for p in SECRET_FILE_PROBLEMS])
async def test_a_secret_file_problem_is_one_line_naming_the_setting_and_exit_2(
        invoke, tmp_path, argv, env, variable, contents, setting):
    path = tmp_path / "secret"
    if contents is not None:
        path.write_bytes(contents)

    outcome = await invoke(*argv, env={**env, variable: str(path)})

    assert (outcome.code, outcome.out) == (2, "")
    [line] = outcome.err.splitlines()
    assert line.startswith(f"mailgun-sync: {setting}: ")
    assert "s3cret" not in line
