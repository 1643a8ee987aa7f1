"""Discovery keeps what it knew: a listing of the account's domains that fails or comes back
incomplete leaves the region's last known domains scheduled (their webhooks still taken), says
so in the log, the metrics and `status`, and only a complete listing removes a domain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from structlog.testing import capture_logs

from tests.support.account import API_KEY
from tests.support.webhooks import SIGNING_KEY, deliver, event
from worker.daemon import Daemon
from worker.domains import Planned, plan_domains
from worker.emulator import EmulatorSettings, Fault, MailgunEmulator
from worker.lifespan import Resources
from worker.mailgun.retry import RetryPolicy
from worker.metrics import Metrics
from worker.serving import build_http_app
from worker.settings import Settings
from worker.webhooks.endpoint import WebhookEndpoint
from worker.webhooks.writer import WebhookStore, WebhookWriter

NAMED = "mg.named.example.com"
FOUND = "mg.found.example.com"
DOMAINS_PATH = "/v3/domains"


@pytest.fixture
async def region() -> AsyncIterator[MailgunEmulator]:
    async with MailgunEmulator(api_key=API_KEY, domains=[NAMED, FOUND],
                               settings=EmulatorSettings(auto_create_domains=False)) as running:
        yield running


@pytest.fixture
def settings(region, tmp_path) -> Settings:
    config = tmp_path / "sync.toml"
    config.write_text(f'lists = ["bounces"]\n[[domains]]\nname = "{NAMED}"\n'
                      f'[discover]\nregions = ["{region.base_url}"]\n')
    return Settings(api_key=API_KEY, api_base=str(region.base_url), config_file=str(config),
                    sync_interval=3600, sync_jitter=0)


@pytest.fixture
def resources(region, pool, store, make_client) -> Resources:
    # One attempt per request: a 503 is the listing's final answer.
    return Resources(pool=pool, store=store,
                     mailgun=make_client(api_base=region.base_url, retry=RetryPolicy(max_attempts=1)))


def planner_for(settings: Settings, resources: Resources):
    async def planner():
        return await plan_domains(settings, resources.mailgun_for, memory=resources.store)
    return planner


def stale(metrics: Metrics, region: MailgunEmulator) -> float | None:
    return metrics.registry.get_sample_value("mailgun_sync_discovery_stale",
                                             {"api_base": str(region.base_url)})


async def test_a_listing_that_fails_keeps_the_regions_domains_scheduled_until_a_complete_one(
        region, settings, resources):
    metrics = Metrics()
    daemon = Daemon(settings, resources, metrics, planner_for(settings, resources))
    await daemon.start()
    try:
        assert daemon.domains() == (FOUND, NAMED)
        assert stale(metrics, region) == 0

        region.fail_next(503, times=None, path_contains=DOMAINS_PATH)
        with capture_logs() as logs:
            await daemon.refresh_domains()
            await daemon.refresh_domains()

        assert daemon.domains() == (FOUND, NAMED)  # still scheduled, its webhooks still taken
        assert stale(metrics, region) == 1
        failed = [e for e in logs if e["event"] == "discovery_failed"]
        assert len(failed) == 2 and sorted(failed[0]["kept_domains"]) == [FOUND, NAMED]
        assert not [e for e in logs if e["event"] == "list_unscheduled"]

        # A complete listing that no longer has the domain (disabled) removes it.
        region.faults.clear()
        region.declare(FOUND, disabled=True)
        await daemon.refresh_domains()
        assert daemon.domains() == (NAMED,)
        assert stale(metrics, region) == 0
    finally:
        await daemon.drain(grace=5)


async def test_after_a_restart_a_failing_listing_uses_the_domains_last_listed(region, settings, resources):
    first = await plan_domains(settings, resources.mailgun_for, memory=resources.store)
    assert [plan.name for plan in first.domains] == [NAMED, FOUND]

    region.fail_next(503, times=None, path_contains=DOMAINS_PATH)
    again = await plan_domains(settings, resources.mailgun_for, memory=resources.store)

    assert [plan.name for plan in again.domains] == [NAMED, FOUND]
    assert again.stale == (str(region.base_url),)
    [failure] = again.failures
    assert "503" in failure and "keeping the 2 domains listed at" in failure


async def test_status_says_which_regions_domains_are_stale_and_why(invoke, region, settings, resources,
                                                                   database_url):
    await plan_domains(settings, resources.mailgun_for, memory=resources.store)
    region.fail_next(503, times=None, path_contains=DOMAINS_PATH)
    await plan_domains(settings, resources.mailgun_for, memory=resources.store)

    env = {"DATABASE_URL": database_url, "SYNC_CONFIG": str(settings.config_file)}
    table = await invoke("status", env=env)
    assert table.code == 0, table.err
    [line] = [line for line in table.out.splitlines() if line.startswith("discovery ")]
    assert f"discovery {region.base_url}: 2 domains" in line
    assert "STALE" in line and "503" in line

    [entry] = (await invoke("status", "--json", env=env)).report()["discovery"]
    assert (sorted(entry["domains"]), entry["stale"]) == ([FOUND, NAMED], True)


def second_pages(region: MailgunEmulator) -> int:
    """Requests for a page of the domain listing after its first."""
    return len([r for r in region.requests if r.path == DOMAINS_PATH and r.query.get("skip", "0") != "0"])


async def plan_changing_between_pages(settings, resources, region, changes) -> Planned:
    """Plan with two pages of domains, making the next of `changes` to the account while each
    second page is held: the listing's first page is read before the change, its second after."""
    for number in range(1000):
        region.declare(f"mg{number:04}.example.com")
    await plan_domains(settings, resources.mailgun_for, memory=resources.store)
    region.declare(FOUND, disabled=True)  # dropped by a complete listing, kept by an incomplete one
    region.inject(Fault(action="delay", delay_s=0.3, times=None, path_contains=DOMAINS_PATH))
    asked = second_pages(region)
    planning = asyncio.create_task(plan_domains(settings, resources.mailgun_for, memory=resources.store))
    for change in changes:
        for _ in range(500):  # until the next second page is asked
            if second_pages(region) > asked or planning.done():
                break
            await asyncio.sleep(0.01)
        asked = second_pages(region)
        change()
    planned = await planning
    region.faults.clear()
    return planned


async def test_a_listing_whose_total_changes_between_pages_is_read_again_whole(
        region, settings, resources):
    planned = await plan_changing_between_pages(settings, resources, region, [
        lambda: region.declare("mg.added.example.com"),  # sorts first: every offset moves
    ])
    names = {plan.name for plan in planned.domains}
    assert (planned.failures, planned.stale) == ([], ())
    assert "mg.added.example.com" in names and "mg0999.example.com" in names and FOUND not in names


async def test_a_listing_shifted_by_a_deletion_and_an_addition_is_read_again_whole(
        region, settings, resources):
    # The total stays 1002, and mg0998 slides from offset 1000 to 999, already passed.
    planned = await plan_changing_between_pages(settings, resources, region, [
        lambda: (region.remove_domain("mg0005.example.com"), region.declare("mg1000.example.com")),
    ])
    names = {plan.name for plan in planned.domains}
    assert (planned.failures, planned.stale) == ([], ())
    assert {"mg0998.example.com", "mg0999.example.com", "mg1000.example.com"} <= names
    assert "mg0005.example.com" not in names and FOUND not in names


@pytest.mark.slow
async def test_a_listing_that_shifts_at_every_reading_is_incomplete_and_removes_nothing(
        region, settings, resources):
    planned = await plan_changing_between_pages(settings, resources, region, [
        lambda k=k: (region.remove_domain(f"mg{k:04}.example.com"), region.declare(f"mg1{k:03}.example.com"))
        for k in range(3)
    ])
    [failure] = planned.failures
    assert "changed while listing" in failure and planned.stale == (str(region.base_url),)
    names = {plan.name for plan in planned.domains}  # the last complete listing
    assert {FOUND, "mg0000.example.com", "mg0998.example.com"} <= names
    assert "mg1000.example.com" not in names


async def test_without_a_remembered_listing_the_daemon_keeps_what_it_scheduled_from_the_region(
        region, settings, resources):
    async def planner():  # no memory: a failed listing brings no domain of the region
        return await plan_domains(settings, resources.mailgun_for)

    daemon = Daemon(settings, resources, Metrics(), planner)
    await daemon.start()
    try:
        region.fail_next(503, times=None, path_contains=DOMAINS_PATH)
        await daemon.refresh_domains()
        assert daemon.domains() == (FOUND, NAMED)
    finally:
        await daemon.drain(grace=5)


async def test_a_webhook_for_a_region_whose_first_listing_failed_is_answered_so_mailgun_retries(
        region, settings, resources, pool, aiohttp_client):
    settings = replace(settings, webhook_signing_key=SIGNING_KEY)
    metrics = Metrics()
    daemon = Daemon(settings, resources, metrics, planner_for(settings, resources))
    writer = WebhookWriter(WebhookStore(pool), max_age=settings.webhook_max_age)
    endpoint = WebhookEndpoint(signing_key=SIGNING_KEY, domains=daemon.domains,
                               max_age=settings.webhook_max_age, writer=writer, metrics=metrics,
                               domains_complete=daemon.domains_complete)
    http = await aiohttp_client(build_http_app(daemon, metrics, endpoint))
    # A first start: nothing remembered of the region, and its listing fails.
    region.fail_next(503, times=None, path_contains=DOMAINS_PATH)
    async with writer:
        await daemon.start()
        try:
            status, text = await deliver(http, event("failed", "x@example.org", FOUND))
            # Not 406, which Mailgun never retries: the domain may be one the region lists.
            assert status == 503, text
            assert "incomplete" in text
        finally:
            await daemon.drain(grace=5)
