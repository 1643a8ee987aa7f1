"""Domains in two regions, each served by its own emulator (as api.mailgun.net and
api.eu.mailgun.net are separate services), configured by a SYNC_CONFIG file or discovered from
the account."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from tests.support.account import API_KEY
from tests.support.mirror import rows
from worker.daemon import build_trigger
from worker.domains import DomainPlan, Planned, parse_sync_config, plan_domains
from worker.emulator import EmulatorSettings, MailgunEmulator
from worker.errors import ConfigError
from worker.records import SYNCED_LISTS, SuppressionList
from worker.settings import EU_API_BASE, US_API_BASE, Settings

US_DOMAIN = "mg.example.com"
EU_DOMAIN = "mg.example.eu"
BOUNCES, COMPLAINTS = SuppressionList.BOUNCES, SuppressionList.COMPLAINTS


@pytest.fixture
async def us() -> AsyncIterator[MailgunEmulator]:
    async with MailgunEmulator(api_key=API_KEY, domains=[US_DOMAIN],
                               settings=EmulatorSettings(auto_create_domains=False)) as region:
        yield region


@pytest.fixture
async def eu() -> AsyncIterator[MailgunEmulator]:
    async with MailgunEmulator(api_key=API_KEY, domains=[EU_DOMAIN],
                               settings=EmulatorSettings(auto_create_domains=False)) as region:
        yield region


@pytest.fixture
def env(us, database_url, pool, tmp_path) -> dict[str, str]:
    return {"MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(us.base_url), "DATABASE_URL": database_url,
            "MAILGUN_BACKOFF_MAX": "0.01", "SYNC_CONFIG": str(tmp_path / "sync.toml")}


def write_config(env: dict[str, str], text: str) -> None:
    Path(env["SYNC_CONFIG"]).write_text(text)


def requested_domains(region: MailgunEmulator) -> set[str]:
    return {r.path.split("/")[2] for r in region.requests if r.path.count("/") >= 3}


async def test_each_domain_is_synced_from_its_own_region(invoke, env, us, eu, pool):
    us.seed(US_DOMAIN, BOUNCES, [{"address": "us-bounce@example.com"}])
    eu.seed(EU_DOMAIN, BOUNCES, [{"address": "eu-bounce@example.com"}])
    eu.seed(EU_DOMAIN, COMPLAINTS, [{"address": "eu-complaint@example.com"}])
    write_config(env, f"""
        [[domains]]
        name = "{US_DOMAIN}"

        [[domains]]
        name = "{EU_DOMAIN}"
        api_base = "{eu.base_url}"
        lists = ["bounces", "complaints"]
    """)

    outcome = await invoke("run", "--json", env=env)

    assert outcome.code == 0, outcome.err
    assert [(r["domain"], r["list"]) for r in outcome.report()["results"]] == [
        *((US_DOMAIN, k.value) for k in SYNCED_LISTS), (EU_DOMAIN, "bounces"), (EU_DOMAIN, "complaints")]
    assert requested_domains(us) == {US_DOMAIN}
    assert requested_domains(eu) == {EU_DOMAIN}
    bounces = await pool.fetch("SELECT domain, address FROM mailgun.bounces ORDER BY domain")
    assert [tuple(r) for r in bounces] == [(US_DOMAIN, "us-bounce@example.com"),
                                           (EU_DOMAIN, "eu-bounce@example.com")]
    assert list(await rows(pool, COMPLAINTS)) == ["eu-complaint@example.com"]


async def test_a_domain_asked_of_the_wrong_region_fails_saying_so_and_the_others_sync(
        invoke, env, us, eu, pool):
    us.seed(US_DOMAIN, BOUNCES, [{"address": "us-bounce@example.com"}])
    write_config(env, f"""
        lists = ["bounces"]
        [[domains]]
        name = "{US_DOMAIN}"
        [[domains]]
        name = "{EU_DOMAIN}"
    """)

    outcome = await invoke("run", "--json", env=env)

    assert outcome.code == 1
    assert outcome.result(US_DOMAIN, "bounces")["status"] == "ok"
    failed = outcome.result(EU_DOMAIN, "bounces")
    assert failed["status"] == "failed"
    assert f"Domain not found: {EU_DOMAIN}" in failed["error"]
    assert "does not know the domain" in failed["error"]
    assert "region" in failed["error"]
    assert list(await rows(pool, BOUNCES)) == ["us-bounce@example.com"]


async def test_a_wrong_region_answering_401_names_the_region_too(invoke, env, us, eu):
    eu.api_key = "key-of-another-account"
    write_config(env, f"""
        [[domains]]
        name = "{EU_DOMAIN}"
        api_base = "{eu.base_url}"
        lists = ["bounces"]
    """)
    outcome = await invoke("run", "--json", env=env)
    assert outcome.code == 1
    error = outcome.result(EU_DOMAIN, "bounces")["error"]
    assert "401" in error and str(eu.base_url) in error and "lives in this region" in error
    assert API_KEY not in outcome.out + outcome.err


async def test_discovery_syncs_every_enabled_domain_of_both_regions(invoke, env, us, eu, pool):
    us.declare("mg.old.example.com", disabled=True)
    us.declare("mg.staging.example.com")
    eu.seed(EU_DOMAIN, BOUNCES, [{"address": "eu-bounce@example.com"}])
    write_config(env, f"""
        [discover]
        regions = ["{us.base_url}", "{eu.base_url}"]
        lists = ["bounces"]
        exclude = ["mg.staging.example.com"]
    """)

    outcome = await invoke("run", "--json", env=env)

    assert outcome.code == 0, outcome.err
    assert [(r["domain"], r["list"]) for r in outcome.report()["results"]] == [
        (US_DOMAIN, "bounces"), (EU_DOMAIN, "bounces")]
    assert list(await rows(pool, BOUNCES)) == ["eu-bounce@example.com"]


async def test_discovery_reads_every_page_of_the_accounts_domains(us, make_client):
    for number in range(2345):
        us.declare(f"mg{number:04d}.example.com")
    discovered = await make_client(api_base=us.base_url).account_domains()
    assert len(discovered) == 2346
    pages = [r.query for r in us.requests if r.path == "/v3/domains"]
    # Each page after the first is asked from the last domain read, which it must begin with.
    assert pages == [{"limit": "1000", "skip": "0"}, {"limit": "1000", "skip": "999"},
                     {"limit": "1000", "skip": "1998"}]
    assert len({domain.name for domain in discovered}) == 2346


async def test_a_domain_named_in_the_file_keeps_its_settings_when_also_discovered(us, make_client, tmp_path):
    config = tmp_path / "sync.toml"
    config.write_text(f"""
        [[domains]]
        name = "{US_DOMAIN}"
        lists = ["complaints"]
        cron = "0 * * * *"
        [discover]
        regions = ["{us.base_url}"]
    """)
    us.declare("mg.found.example.com")
    settings = Settings(api_key=API_KEY, api_base=str(us.base_url), config_file=str(config))
    client = make_client(api_base=us.base_url)

    plans = (await plan_domains(settings, lambda base: client)).domains

    assert plans == [
        DomainPlan(US_DOMAIN, str(us.base_url), (COMPLAINTS,), None, "0 * * * *"),
        DomainPlan("mg.found.example.com", str(us.base_url), SYNCED_LISTS, discovered=True),
    ]
    assert (await plan_domains(settings, lambda base: client, only=["mg.other.example.com"],
                               lists=[BOUNCES])).domains == [
        DomainPlan("mg.other.example.com", str(us.base_url), (BOUNCES,))]


def test_regions_by_name_and_schedules_per_domain():
    config = parse_sync_config("""
        region = "eu"
        interval = 600
        [[domains]]
        name = "mg.a.example.eu"
        [[domains]]
        name = "mg.b.example.com"
        region = "us"
        cron = "*/5 * * * 1-5"
    """, source="sync.toml", default_api_base=US_API_BASE)
    first, second = config.domains
    assert (first.api_base, first.interval, first.cron) == (EU_API_BASE, 600.0, None)
    assert (second.api_base, second.interval, second.cron) == (US_API_BASE, None, "*/5 * * * 1-5")
    settings = Settings(api_key=API_KEY, sync_interval=900, sync_jitter=0)
    assert build_trigger(settings, first).interval.total_seconds() == 600
    assert str(build_trigger(settings, second).fields[4]) == "mon,tue,wed,thu,fri"


@pytest.mark.parametrize(("text", "named"), [
    ("[[domains]]\nname = 'mg.example.com'\nregion = 'mars'", "#1 (mg.example.com): region 'mars'"),
    ("[[domains]]\nname = 'mg.example.com'\nlists = ['bounces', 'spam']", "lists"),
    ("[[domains]]\nname = 'mg.example.com'\ninterval = 60\ncron = '* * * * *'", "not both"),
    ("[[domains]]\nname = 'mg.example.com'\nregoin = 'eu'", "unknown key 'regoin'"),
    ("[[domains]]\nlists = ['bounces']", "#1: has no name"),
    ("[[domains]]\nname = 'localhost'", "#1: name 'localhost' is not a domain name"),
    ("[[domains]]\nname = 'a.example.com'\n[[domains]]\nname = 'a.example.com'", "listed twice"),
    ("[discover]\nregions = []", "[discover]: regions"),
    ("region = 'us'", "names no domain"),
    ("[[domains]\nname = 'x'", "not valid TOML"),
])
def test_a_malformed_configuration_names_the_file_and_the_place(text, named):
    with pytest.raises(ConfigError) as caught:
        parse_sync_config(text, source="sync.toml", default_api_base=US_API_BASE)
    assert caught.value.setting == "SYNC_CONFIG"
    assert str(caught.value).startswith("SYNC_CONFIG: sync.toml")
    assert named in str(caught.value)


async def test_a_malformed_or_missing_file_exits_2_before_anything_runs(invoke, env, us):
    write_config(env, "[[domains]]\nname = 'mg.example.com'\nregion = 'mars'\n")
    outcome = await invoke("run", env=env)
    assert outcome.code == 2
    assert "SYNC_CONFIG" in outcome.err and "region 'mars'" in outcome.err
    assert not us.requests
    missing = await invoke("run", env={**env, "SYNC_CONFIG": env["SYNC_CONFIG"] + ".missing"})
    assert missing.code == 2 and "cannot read" in missing.err


async def test_the_daemon_syncs_each_region_and_picks_up_domains_added_later(
        us, eu, pool, store, make_client):
    from worker.daemon import Daemon
    from worker.lifespan import Resources
    from worker.metrics import Metrics

    us.seed(US_DOMAIN, BOUNCES, [{"address": "us-bounce@example.com"}])
    eu.seed(EU_DOMAIN, BOUNCES, [{"address": "eu-bounce@example.com"}])
    planned = [DomainPlan(US_DOMAIN, str(us.base_url), (BOUNCES,))]

    async def planner() -> Planned:
        return Planned(list(planned), [])

    clients = {str(region.base_url): make_client(api_base=region.base_url) for region in (us, eu)}
    resources = Resources(pool=pool, store=store, mailgun=clients[str(us.base_url)],
                          regional=clients.__getitem__)
    settings = Settings(api_key=API_KEY, api_base=str(us.base_url), sync_interval=1, sync_jitter=0)
    daemon = Daemon(settings, resources, Metrics(), planner)
    await daemon.start()
    try:
        await wait_until(lambda: ran(pool, US_DOMAIN))
        planned.append(DomainPlan(EU_DOMAIN, str(eu.base_url), (BOUNCES,)))
        await daemon.refresh_domains()
        await wait_until(lambda: ran(pool, EU_DOMAIN))
    finally:
        await daemon.drain(grace=5)
    assert requested_domains(eu) == {EU_DOMAIN}
    assert list(await rows(pool, BOUNCES)) == ["eu-bounce@example.com", "us-bounce@example.com"]


async def ran(pool, domain: str) -> bool:
    return bool(await pool.fetchval(
        "SELECT count(*) FROM mailgun.sync_runs WHERE domain = $1 AND status = 'ok'", domain))


async def wait_until(condition, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_the_readmes_example_configuration_is_valid():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    config = parse_sync_config(example, source="README.md", default_api_base=US_API_BASE)
    assert [(d.name, d.api_base) for d in config.domains] == [
        ("mg.example.com", US_API_BASE), ("mg.example.eu", EU_API_BASE)]
    assert config.discover is not None and config.discover.api_bases == (US_API_BASE, EU_API_BASE)


async def test_status_lists_the_domains_of_the_configuration_file(invoke, env, us):
    write_config(env, f"""
        [[domains]]
        name = "{US_DOMAIN}"
        [[domains]]
        name = "{EU_DOMAIN}"
        region = "eu"
    """)
    outcome = await invoke("status", "--json", env=env)
    assert outcome.code == 0, outcome.err
    listed = {(row["domain"], row["list"]) for row in orjson.loads(outcome.out)["lists"]}
    assert listed == {(d, k.value) for d in (US_DOMAIN, EU_DOMAIN) for k in SYNCED_LISTS}
    assert not us.requests


async def test_a_region_that_cannot_be_listed_fails_the_run_but_the_named_domains_sync(
        invoke, env, us, eu, pool):
    us.seed(US_DOMAIN, BOUNCES, [{"address": "us-bounce@example.com"}])
    eu.fail_next(503, times=None)
    write_config(env, f"""
        lists = ["bounces"]
        [[domains]]
        name = "{US_DOMAIN}"
        [discover]
        regions = ["{eu.base_url}"]
    """)

    outcome = await invoke("run", "--json", "--max-attempts", "1", env=env)

    assert outcome.code == 1
    report = outcome.report()
    assert [(r["domain"], r["status"]) for r in report["results"]] == [(US_DOMAIN, "ok")]
    [failure] = report["discovery_errors"]
    assert str(eu.base_url) in failure and "503" in failure
    assert list(await rows(pool, BOUNCES)) == ["us-bounce@example.com"]


async def test_a_discovered_domain_named_with_domain_keeps_its_region(invoke, env, us, eu, pool):
    eu.seed(EU_DOMAIN, BOUNCES, [{"address": "eu-bounce@example.com"}])
    write_config(env, f"""
        [discover]
        regions = ["{us.base_url}", "{eu.base_url}"]
    """)
    outcome = await invoke("run", "--json", "--domain", EU_DOMAIN, "--list", "bounces", env=env)
    assert outcome.code == 0, outcome.err
    assert requested_domains(us) == set()
    assert list(await rows(pool, BOUNCES)) == ["eu-bounce@example.com"]


async def test_a_bad_weekday_in_a_domains_cron_exits_2_before_anything_runs(invoke, env, us):
    write_config(env, f'[[domains]]\nname = "{US_DOMAIN}"\ncron = "0 0 * * 8"\n')
    outcome = await invoke("run", env=env)
    assert outcome.code == 2
    [line] = outcome.err.splitlines()
    assert line.startswith(f"mailgun-sync: SYNC_CONFIG: {env['SYNC_CONFIG']} [[domains]] #1 ({US_DOMAIN}): ")
    assert "cron: weekday 8 is outside 0-7" in line
    assert not us.requests


async def test_a_refresh_moves_a_domain_to_its_new_region_and_forgets_dropped_failing_lists(
        us, eu, pool, store, make_client):
    from worker.daemon import Daemon
    from worker.lifespan import Resources
    from worker.mailgun.retry import RetryPolicy
    from worker.metrics import Metrics

    eu.seed(EU_DOMAIN, BOUNCES, [{"address": "eu-bounce@example.com"}])
    planned = [DomainPlan(EU_DOMAIN, str(us.base_url), (BOUNCES,))]  # the wrong region

    async def planner() -> Planned:
        return Planned(list(planned), [])

    clients = {str(r.base_url): make_client(api_base=r.base_url, retry=RetryPolicy(max_attempts=1))
               for r in (us, eu)}
    resources = Resources(pool=pool, store=store, mailgun=clients[str(us.base_url)],
                          regional=clients.__getitem__)
    settings = Settings(api_key=API_KEY, api_base=str(us.base_url), sync_interval=1, sync_jitter=0)
    metrics = Metrics()
    daemon = Daemon(settings, resources, metrics, planner)
    await daemon.start()

    async def failing() -> bool:
        return (metrics.registry.get_sample_value(
            "mailgun_sync_consecutive_failures", {"domain": EU_DOMAIN, "list": "bounces"}) or 0) > 0

    try:
        await wait_until(failing)
        planned[0] = DomainPlan(EU_DOMAIN, str(eu.base_url), (BOUNCES,))
        await daemon.refresh_domains()
        await wait_until(lambda: ran(pool, EU_DOMAIN))
        assert list(await rows(pool, BOUNCES)) == ["eu-bounce@example.com"]

        planned[0] = DomainPlan(EU_DOMAIN, str(us.base_url), (BOUNCES,))
        await daemon.refresh_domains()
        await wait_until(failing)
        planned.clear()
        await daemon.refresh_domains()
        assert metrics.registry.get_sample_value(
            "mailgun_sync_consecutive_failures", {"domain": EU_DOMAIN, "list": "bounces"}) is None
        assert await daemon.readiness() is None
    finally:
        await daemon.drain(grace=5)
