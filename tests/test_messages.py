"""What a command says when it refuses something: what is accepted, and where the problem is
(the setting or flag, the file and the entry), in one line."""

from __future__ import annotations

import pytest

from tests.support.account import API_KEY, DOMAIN
from worker.domains import parse_sync_config
from worker.errors import ConfigError
from worker.settings import US_API_BASE, Settings


@pytest.mark.parametrize("value", ["0", "-1", "601", "nan"])
def test_mailgun_timeout_out_of_range_says_the_range_accepted(value):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"MAILGUN_API_KEY": API_KEY, "MAILGUN_TIMEOUT": value})
    assert str(caught.value) == f"MAILGUN_TIMEOUT: {value!r} is not a number of seconds above 0, at most 600"


def test_a_domain_entry_without_a_name_says_the_name_is_missing_and_which_entry():
    text = '[[domains]]\nname = "mg.example.com"\n\n[[domains]]\nregion = "eu"\n'
    with pytest.raises(ConfigError) as caught:
        parse_sync_config(text, source="sync.toml", default_api_base=US_API_BASE)
    assert caught.value.problem == (
        'sync.toml [[domains]] #2: has no name; give the domain\'s, as in name = "mg.example.com"')


async def test_a_bad_cron_in_a_config_file_given_by_a_relative_path_names_the_file_and_the_key(
        invoke, tmp_path, monkeypatch):
    (tmp_path / "sync.toml").write_text(f'[[domains]]\nname = "{DOMAIN}"\ncron = "0 0 30 2 *"\n')
    monkeypatch.chdir(tmp_path)
    env = {"MAILGUN_API_KEY": API_KEY, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"}
    for argv in (["--config", "sync.toml"], ["--config=sync.toml"]):
        outcome = await invoke("daemon", *argv, env=env)
        assert outcome.code == 2
        assert outcome.err == (f"mailgun-sync: SYNC_CONFIG: sync.toml [[domains]] #1 ({DOMAIN}): cron: "
                               "'0 0 30 2 *' names no date that exists, so it never fires\n")


async def test_webhook_test_with_a_url_that_is_no_url_is_one_line_and_exit_2(invoke):
    outcome = await invoke("webhook-test", "--url", "not-a-url", "--signing-key", "k", "--domain", DOMAIN,
                           env={})
    assert (outcome.code, outcome.out) == (2, "")
    assert outcome.err == ("mailgun-sync: --url: is not an http:// or https:// URL; give the endpoint, "
                           "such as https://sync.example.com/webhooks/mailgun\n")


async def test_webhook_test_of_an_endpoint_that_never_answers_is_one_line_and_exit_1(invoke):
    outcome = await invoke("webhook-test", "--url", "http://127.0.0.1:9/webhooks/mailgun",
                           "--signing-key", "k", "--domain", DOMAIN, env={})
    assert (outcome.code, outcome.out) == (1, "")
    [line] = outcome.err.splitlines()
    assert line.startswith("mailgun-sync: --url: the endpoint answered none of the samples: Cannot connect")


@pytest.mark.parametrize("url", ["http://[::1", "http://[::1]x/", "http://", "https:///webhooks/mailgun"])
async def test_webhook_test_with_a_url_that_does_not_parse_is_one_line_naming_url_and_exit_2(invoke, url):
    outcome = await invoke("webhook-test", "--url", url, "--signing-key", "k", "--domain", DOMAIN, env={})
    assert (outcome.code, outcome.out) == (2, "")
    assert outcome.err == ("mailgun-sync: --url: is not an http:// or https:// URL; give the endpoint, "
                           "such as https://sync.example.com/webhooks/mailgun\n")


@pytest.mark.parametrize(("url", "said"), [
    ("http://127.0.0.1:99999/webhooks/mailgun", "port 99999 is"),
    ("https://[::1]:70000/", "port 70000 is"),
    ("http://127.0.0.1:0/", "port 0 is"),
    ("http://127.0.0.1:http/", "its port is"),  # not digits: not shown
])
async def test_webhook_test_with_a_port_out_of_range_is_a_usage_error_naming_the_port(invoke, url, said):
    outcome = await invoke("webhook-test", "--url", url, "--signing-key", "k", "--domain", DOMAIN, env={})
    assert (outcome.code, outcome.out) == (2, "")
    assert outcome.err == f"mailgun-sync: --url: {said} not a port number from 1 to 65535\n"
