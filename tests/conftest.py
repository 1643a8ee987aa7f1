"""Shared fixtures: the Mailgun emulator on a real port, an HTTP session, clients with fast retries,
and a real PostgreSQL (the server on 127.0.0.1:5432 when one answers, else an embedded one). The
hooks fail a test that starts a process without being marked slow (tests/support/slow.py)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog

from tests.support.account import API_KEY, DOMAIN
from tests.support.cli import Outcome
from tests.support.database import TestDatabase, open_test_database
from tests.support.mirror import empty_mirror
from tests.support.slow import ProcessGuard
from tests.support.waiting import SleepLog
from tests.support.webhooks import SIGNING_KEY, webhook_app
from worker.cli import cli
from worker.database import open_pool
from worker.devtools.scratch import database_statement, run_admin, with_database
from worker.emulator import EmulatorSettings, MailgunEmulator
from worker.mailgun import MailgunClient
from worker.mailgun.retry import RetryPolicy
from worker.migrate import migrate
from worker.reconcile import ReconcileOptions, Reconciler
from worker.settings import Settings
from worker.store import MirrorStore


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(ProcessGuard(), "process-guard")


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    return EmulatorSettings()


@pytest.fixture
async def emulator(emulator_settings: EmulatorSettings) -> AsyncIterator[MailgunEmulator]:
    async with MailgunEmulator(api_key=API_KEY, domains=[DOMAIN],
                               settings=emulator_settings) as running:
        yield running


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def sleeps() -> SleepLog:
    return SleepLog()


@pytest.fixture
def make_client(emulator: MailgunEmulator, http_session: aiohttp.ClientSession,
                sleeps: SleepLog) -> Callable[..., MailgunClient]:
    """A client for the emulator whose retries do not really wait; keywords override defaults."""

    def make(**overrides: Any) -> MailgunClient:
        options: dict[str, Any] = {
            "api_base": emulator.base_url,
            "api_key": API_KEY,
            "retry": RetryPolicy(max_attempts=4, backoff_max=5.0, sleep=sleeps),
            "timeout": 5.0,
        }
        options.update(overrides)
        return MailgunClient(http_session, **options)

    return make


@pytest.fixture
def client(make_client: Callable[..., MailgunClient]) -> MailgunClient:
    return make_client()


@pytest.fixture(scope="session")
def test_database() -> Iterator[TestDatabase]:
    """One database for the whole test run, created empty and dropped at the end."""
    with open_test_database() as database:
        yield database


@pytest.fixture(scope="session")
def database_url(test_database: TestDatabase) -> str:
    """The run's database with the mirror's schema applied."""

    async def setup() -> None:
        async with open_pool(test_database.url, max_size=1) as pool:
            await migrate(pool)

    asyncio.run(setup())
    return test_database.url


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a mirror emptied for this test."""
    async with open_pool(database_url) as opened:
        await empty_mirror(opened)
        yield opened


@pytest.fixture
def store(pool: asyncpg.Pool) -> MirrorStore:
    return MirrorStore(pool)


@pytest.fixture
def make_reconciler(store: MirrorStore, client: MailgunClient) -> Callable[..., Reconciler]:
    def make(client: MailgunClient = client, **options: Any) -> Reconciler:
        return Reconciler(store, client, ReconcileOptions(**options))

    return make


@pytest.fixture
def invoke(capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    """Run `mailgun-sync ARGV` in-process with exactly `env`; returns an Outcome."""
    async def call(*argv: str, env: dict[str, str]) -> Outcome:
        capsys.readouterr()
        code = await cli(list(argv), env=env)
        out, err = capsys.readouterr()
        return Outcome(code, out, err)

    return call


@pytest.fixture
async def empty_database_url(test_database: TestDatabase) -> AsyncIterator[str]:
    """A database of its own on the tests' server, without the mirror's schema; dropped afterwards."""
    name = f"mailgun_sync_empty_{secrets.token_hex(4)}"
    await run_admin(test_database.admin_url, database_statement("create_database", name))
    try:
        yield with_database(test_database.admin_url, name)
    finally:
        await run_admin(test_database.admin_url, database_statement("drop_database", name))


@pytest.fixture
async def webhook_http(pool: asyncpg.Pool, client: MailgunClient, emulator: MailgunEmulator,
                       aiohttp_client: Any) -> AsyncIterator[Any]:
    """The daemon's HTTP app taking DOMAIN's signed webhooks, on a test client."""
    settings = Settings(api_key=API_KEY, api_base=str(emulator.base_url), domains=(DOMAIN,),
                        webhook_signing_key=SIGNING_KEY)
    async with webhook_app(pool, client, settings) as app:
        yield await aiohttp_client(app)
