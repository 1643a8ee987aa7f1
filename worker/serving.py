"""The daemon's process: its HTTP ports (/healthz, /readyz, /metrics and Mailgun's webhooks, on one
port or two), its signals, and the order in which it starts and stops: ports first, then the
schedule (worker/daemon.py); on SIGTERM the runs drain, then the webhooks in flight are answered,
then the pools close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from worker.daemon import Daemon, Planner
from worker.errors import StartupError
from worker.lifespan import Resources
from worker.logs import get_logger
from worker.metrics import Metrics
from worker.settings import Settings
from worker.webhooks.endpoint import MAX_BODY, REFUSALS_LOGGED_EVERY, WebhookEndpoint
from worker.webhooks.writer import WebhookStore, WebhookWriter

log = get_logger(__name__)


# How long a client has to send a whole request head, from its connection's opening or its
# previous answer; so also how long a connection may idle between requests (aiohttp's
# keep-alive timer starts with the connection, and closes it if no whole head has come by then).
# Anyone on the internet may open connections to the webhooks' port: a connection that sends
# half a request and then nothing (slowloris) would otherwise hold a file descriptor for good.
# The body has its own bound (the endpoint's BODY_WITHIN).
REQUEST_HEAD_WITHIN = 15.0
# The most open files asked for when the hard limit is unlimited (Linux's default fs.nr_open).
OPEN_FILES_CEILING = 1 << 20


def raise_open_files_limit() -> int:
    """Raise the soft limit of open files to the hard one, and return the limit now in force. A
    container's soft limit is often 1,024 (containerd 2), which the webhooks' connections alone
    could use up, leaving none for the probes or PostgreSQL; its hard limit is far higher."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:  # kept as it is: said, not fatal
            log.warning("open_files_limit_not_raised", soft=soft, hard=hard, error=str(exc))
            return soft
        return wanted
    return soft


class _MalformedRequests(logging.Filter):
    """aiohttp's server answers a request it cannot parse (a broken chunk, a bad header) 400
    itself, and logs it at error with a traceback: a flood of them, from anyone on the internet,
    would flood the logs. They are said at most once a second instead, in one warning line without
    a traceback; what fails on the server's side keeps its traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._said = -REFUSALS_LOGGED_EVERY
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError | ConnectionError):
            return True
        now = time.monotonic()
        if now - self._said >= REFUSALS_LOGGED_EVERY:
            reason = " ".join(exc.message.split()) if isinstance(exc, HttpProcessingError) else str(exc)
            log.warning("http_request_refused", status=getattr(exc, "code", None) or None,
                        reason=reason[:200], not_logged_before=self._held)
            self._said, self._held = now, 0
        else:
            self._held += 1
        return False


def build_http_app(daemon: Daemon, metrics: Metrics,
                   webhooks: WebhookEndpoint | None = None) -> web.Application:
    """/healthz, /readyz and /metrics, and the webhooks when given."""
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        problem = await daemon.readiness()
        if problem:
            return web.Response(status=503, text=f"not ready: {problem}\n")
        return web.Response(text="ready\n")

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    if webhooks is not None:
        webhooks.register(app)
    return app


def build_webhook_app(webhooks: WebhookEndpoint) -> web.Application:
    """The webhooks alone, for WEBHOOK_PORT."""
    app = web.Application(client_max_size=MAX_BODY)
    webhooks.register(app)
    return app


async def serve(settings: Settings, resources: Resources, metrics: Metrics, planner: Planner, *,
                stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop`), then drain and return."""
    stop = stop or asyncio.Event()
    open_files = raise_open_files_limit()
    daemon = Daemon(settings, resources, metrics, planner)
    writer = WebhookWriter(WebhookStore(resources.serving), max_age=settings.webhook_max_age) \
        if settings.webhook_signing_key else None
    # Webhooks are taken for the domains the daemon syncs, as planned now and at each refresh.
    webhooks = WebhookEndpoint(signing_key=settings.webhook_signing_key, domains=daemon.domains,
                               max_age=settings.webhook_max_age, writer=writer, metrics=metrics,
                               domains_complete=daemon.domains_complete)
    # With WEBHOOK_PORT the webhooks have a port of their own, which an ingress can expose whole;
    # /metrics and the probes stay on HTTP_PORT.
    # Each site: its app, its port, the setting that names the port, its name in daemon_started.
    http = (settings.http_port, "HTTP_PORT (--http-port)", "http_port")
    if settings.webhook_port is None:
        sites = [(build_http_app(daemon, metrics, webhooks), *http)]
    else:
        sites = [(build_http_app(daemon, metrics), *http),
                 (build_webhook_app(webhooks), settings.webhook_port, "WEBHOOK_PORT (--webhook-port)",
                  "webhook_port")]
    runners = [web.AppRunner(app, access_log=None, handle_signals=False,
                             keepalive_timeout=REQUEST_HEAD_WITHIN) for app, *_ in sites]
    malformed = _MalformedRequests()
    logging.getLogger("aiohttp.server").addFilter(malformed)
    for runner in runners:
        await runner.setup()
    if writer is not None:
        writer.start()
    loop = asyncio.get_running_loop()
    stopped_at: float | None = None
    try:
        # The ports open first, so /healthz answers while the domains are planned (discovery may
        # wait on Mailgun's retries); webhooks are answered 503 until then, and Mailgun retries.
        # Every IPv4 interface (0.0.0.0, not IPv6's) on purpose: in a container the probes,
        # Prometheus and Mailgun's webhooks reach the pod's address, never its loopback; what is
        # exposed is the Service's business.
        ports: dict[str, int] = {}
        for runner, (_, port, setting, name) in zip(runners, sites, strict=True):
            try:
                await web.TCPSite(runner, "0.0.0.0", port).start()  # nosec B104
            except OSError as exc:
                raise StartupError.listening(exc, setting, "0.0.0.0", port) from None  # nosec B104
            ports[name] = runner.addresses[0][1]  # as bound: port 0 is any free one
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await daemon.start(ports, open_files=open_files)
        await stop.wait()
        log.info("stop_requested")
        stopped_at = loop.time()
        await daemon.drain(settings.shutdown_grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        # The webhooks in flight are written within the grace too: past it the writer gives up
        # the write under way (a database that does not answer) and they are answered 503.
        deadline = (loop.time() if stopped_at is None else stopped_at) + settings.shutdown_grace
        abandon = loop.call_at(deadline, writer.abandon) if writer is not None else None
        for runner in runners:
            await runner.cleanup()  # answers the webhooks in flight first
        if writer is not None:
            await writer.stop(within=max(deadline - loop.time(), 0.0))
        if abandon is not None:
            abandon.cancel()
        logging.getLogger("aiohttp.server").removeFilter(malformed)
    log.info("daemon_stopped")
