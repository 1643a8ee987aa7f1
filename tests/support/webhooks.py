"""The daemon's HTTP app with its webhook endpoint on a real port, and signed deliveries to it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp.test_utils import TestClient

from worker.daemon import Daemon, fixed_plans
from worker.domains import DomainPlan
from worker.lifespan import Resources
from worker.mailgun import MailgunClient
from worker.metrics import Metrics
from worker.serving import build_http_app
from worker.settings import Settings
from worker.store import MirrorStore
from worker.webhooks.endpoint import PATH, WebhookEndpoint
from worker.webhooks.selftest import event_data, signed
from worker.webhooks.writer import WebhookStore, WebhookWriter

SIGNING_KEY = "whk-test-0123456789abcdef0123456789"


@contextlib.asynccontextmanager
async def webhook_app(pool: asyncpg.Pool, client: MailgunClient, settings: Settings,
                      *, signing_key: str | None = SIGNING_KEY,
                      metrics: Metrics | None = None) -> AsyncIterator[Any]:
    """The daemon's app (not scheduling) with a running webhook writer."""
    metrics = metrics or Metrics()
    daemon = Daemon(settings, Resources(pool=pool, store=MirrorStore(pool), mailgun=client), metrics,
                    fixed_plans([DomainPlan(domain, client.api_base) for domain in settings.domains]))
    writer = WebhookWriter(WebhookStore(pool), max_age=settings.webhook_max_age) if signing_key else None
    endpoint = WebhookEndpoint(signing_key=signing_key, domains=settings.domains,
                               max_age=settings.webhook_max_age, writer=writer, metrics=metrics)
    app = build_http_app(daemon, metrics, endpoint)
    if writer is None:
        yield app
        return
    async with writer:
        yield app


async def deliver(http: TestClient[Any, Any] | aiohttp.ClientSession, payload: Any, *, path: str = PATH,
                  url: str = "") -> tuple[int, str]:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    async with http.post(url + path, data=body, headers={"Content-Type": "application/json"}) as response:
        return response.status, (await response.text()).strip()


def event(kind: str, recipient: str, domain: str, key: str = SIGNING_KEY, **options: Any) -> dict[str, Any]:
    """A signed delivery of one event; `token` and `signed_at` (Unix time) go to the signature."""
    token = options.pop("token", None)
    stamp = options.pop("signed_at", None)
    return signed(key, event_data(kind, recipient, domain, **options), token=token, timestamp=stamp)
