"""The `mailgun-sync` command: argument parsing, the one error boundary, and exit codes.

Exit codes: 0 success; 1 a list did not end `ok` or `skipped`, the run failed, or the system
refused what the process needs (a port, a host, a path); 2 a setting or argument is missing or
malformed; 130 and 143 stopped by SIGINT and SIGTERM (the daemon and the emulator: 0, a stop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import gc
import itertools
import os
import re
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import orjson

from worker import __version__
from worker.backfill import Backfiller, Progress
from worker.cron import VOCABULARY as CRON_VOCABULARY
from worker.daemon import build_trigger
from worker.database import open_pool, wrap_db_errors
from worker.domains import DomainPlan, Planned, plan_domains, read_sync_config
from worker.emulator import EmulatorSettings, MailgunEmulator
from worker.errors import ConfigError, StartupError, SyncError
from worker.grants import grant_statements, role_identifier
from worker.lifespan import Resources, open_resources
from worker.logs import configure_logging, get_logger
from worker.mailgun import MailgunClient
from worker.metrics import Metrics
from worker.migrate import migrate, pending_migrations
from worker.reconcile import ListResult, ReconcileOptions, Reconciler
from worker.records import SYNCED_LISTS, SuppressionList
from worker.report import (
    TABLE_MOST_LISTS,
    discovery_status,
    list_status,
    render_discovery,
    render_status,
    render_summary,
    render_table,
    render_unsynced,
    warn_of_unsynced_rows,
)
from worker.retention import prune
from worker.retention import render as render_prune
from worker.serving import serve
from worker.settings import (
    US_API_BASE,
    Settings,
    domain_names,
    require_database_url,
    retention_days,
    secret,
)
from worker.store import MirrorStore

log = get_logger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# A command stopped by a signal exits as a shell reports one killed by it: 128 + its number.
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}

# What a command runs, set on its parser as set_defaults(handler=...).
Handler = Callable[[argparse.Namespace, Mapping[str, str]], Awaitable[int]]


# An option's name as the parser spells them (long, lower case) or -h: a word of the command line
# shaped so is shown in a usage error; any other word (a value, "-pSECRET") is not.
_OPTION_NAME = re.compile(r"--[a-z][a-z0-9-]*|-h")


# The parser's own vocabulary, kept in usage errors wherever it appears: the commands' names and
# every choice an argument offers (filled when the parser is built), the crontab's field names
# and macros, the URL schemes --url takes. A message names them; none of them is a secret.
_URL_SCHEMES = ("http://", "https://")
_VOCABULARY: set[str] = {*CRON_VOCABULARY, *_URL_SCHEMES}
# Shorter words are not hidden: replacing them would garble the message, and shown alone they
# give away no secret.
_SHORTEST_HIDDEN = 4
# A file's path is shown: an error about a file must say which, and a secret is no path. So is
# the value of a flag that takes a file, relative as it may be (`--config sync.toml`).
_PATH_STARTS = ("/", "./", "../", "~/")
_PATH_FLAGS = ("--config", "--seed", "--keep")
# A value is hidden where it stands whole: not where it is the start or the end of a longer word
# of the message ("bounce" in "bounces", "http:" in "http://"). What ends a word: a space, a
# quote, a bracket, a comma, a semicolon, an equals sign, or a sentence's punctuation.
_ENDS = r"""\s'"()\[\]{}<>,;="""
_BEFORE = rf"(?<![^{_ENDS}:])"
_AFTER = rf"(?=$|[{_ENDS}]|[.:!?](?:$|\s))"


def _path_values(argv: Sequence[str]) -> set[str]:
    values = {value for flag, value in itertools.pairwise(argv) if flag in _PATH_FLAGS}
    return values | {word.split("=", 1)[1] for word in argv if word.split("=", 1)[0] in _PATH_FLAGS
                     and "=" in word}


def _choices(parser: argparse.ArgumentParser) -> Iterator[str]:
    """Every choice of the parser's arguments and its subcommands', their names included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name
                yield from _choices(sub)
        elif action.choices is not None:
            yield from (str(choice) for choice in action.choices)


def _shown(word: str, paths: set[str]) -> bool:
    """Whether a word of the command line may appear in an error: an option's or command's name,
    the parser's vocabulary (alone or in words of it: `--cron "minute hour"`), a path."""
    return (len(word) < _SHORTEST_HIDDEN or bool(_OPTION_NAME.fullmatch(word))
            or all(piece.lower() in _VOCABULARY for piece in word.split())
            or word.startswith(_PATH_STARTS) or word in paths)


def shown_usage_error(message: str, argv: Sequence[str]) -> str:
    """An error's message without any value of the command line in it, however argparse or a
    setting's check quoted, cased or cut it: a secret given to the wrong flag, or a URL given where
    a command was expected, would be echoed. Option and command names, the parser's vocabulary and
    paths are kept, and so is the message's own text where a value is part of a longer word."""
    words = set(argv) | {part for word in argv if "=" in word for part in word.split("=", 1)}
    paths = _path_values(argv)
    hidden = {form for word in words if not _shown(word, paths)
              for form in (word, repr(word)[1:-1])}  # as typed, and as a repr() quotes it
    if not hidden:
        return message
    # One pass, longest first: a shorter value never matches inside a longer one already hidden.
    either = "|".join(re.escape(form) for form in sorted(hidden, key=len, reverse=True))
    return re.sub(f"{_BEFORE}(?:{either}){_AFTER}", "…", message, flags=re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """Usage errors become ConfigError, so they leave through the same one-line boundary."""

    def error(self, message: str) -> Any:
        raise ConfigError("arguments", message)  # cli() hides the command line's values in it


def port_number(text: str) -> int:
    """A TCP port for argparse: 0 (any free one) to 65535."""
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 0 to 65535")
    return int(text)


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that override the environment; each names its variable."""
    parser.add_argument("--api-base", dest="MAILGUN_API_BASE", metavar="URL",
                        help="Mailgun origin (env MAILGUN_API_BASE; EU: https://api.eu.mailgun.net)")
    parser.add_argument("--database-url", dest="DATABASE_URL", metavar="URL",
                        help="PostgreSQL URL of the mirror (env DATABASE_URL)")
    parser.add_argument("--max-attempts", dest="MAILGUN_MAX_ATTEMPTS", metavar="N",
                        help="tries per Mailgun request (env MAILGUN_MAX_ATTEMPTS, default 6)")
    parser.add_argument("--backoff-max", dest="MAILGUN_BACKOFF_MAX", metavar="SECONDS",
                        help="longest wait between tries (env MAILGUN_BACKOFF_MAX, default 60)")
    parser.add_argument("--pull-ranges", dest="SYNC_PULL_RANGES", metavar="N",
                        help="parallel keyset ranges for a large list (env SYNC_PULL_RANGES, default 16)")
    parser.add_argument("--max-delete-fraction", dest="SYNC_MAX_DELETE_FRACTION", metavar="F",
                        help="largest share of a list a run may remove (env SYNC_MAX_DELETE_FRACTION, 0.1)")


def _add_retention_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retention-days", dest="SYNC_RETENTION_DAYS", metavar="DAYS",
                        help="days the change log and run records are kept, 0 for ever "
                        "(env SYNC_RETENTION_DAYS, default 30)")


def _add_scope_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", action="append", dest="domains", metavar="D",
                        help="a sending domain (repeatable; default: MAILGUN_DOMAINS and SYNC_CONFIG)")
    parser.add_argument("--config", dest="SYNC_CONFIG", metavar="FILE",
                        help="TOML file of domains with their region, lists and schedule (env SYNC_CONFIG)")
    parser.add_argument("--list", action="append", dest="lists", metavar="L",
                        choices=[k.value for k in SYNCED_LISTS],
                        help="bounces, unsubscribes, complaints, allowlist (repeatable; default: all)")


@functools.cache  # parsing leaves the parser as it was; building it costs more than a parse
def build_parser() -> argparse.ArgumentParser:
    from worker.devtools import cli as devtools  # imported here: it imports this module

    parser = _Parser(
        prog="mailgun-sync",
        description="Keep Mailgun's suppression lists and a PostgreSQL mirror in step.")
    parser.add_argument("--version", action="version", version=f"mailgun-sync {__version__}")
    parser.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="DEBUG, INFO, WARNING or ERROR (default INFO; WARNING for demo)")
    parser.set_defaults(default_log_level="INFO")  # a command may set its own
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    run = commands.add_parser("run", help="reconcile every configured domain and list once, then exit")
    _add_scope_flags(run)
    run.add_argument("--dry-run", action="store_true",
                     help="print what would change on either side, change nothing")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    run.add_argument("--allow-mass-delete", action="store_true",
                     help="let a run remove more than SYNC_MAX_DELETE_FRACTION of a list")
    _add_settings_flags(run)
    run.set_defaults(handler=run_command)

    daemon = commands.add_parser("daemon", help="reconcile every domain and list on a schedule, serve "
                                 "/healthz, /readyz and /metrics, drain on SIGTERM")
    _add_scope_flags(daemon)
    daemon.add_argument("--interval", dest="SYNC_INTERVAL", metavar="SECONDS",
                        help="seconds between runs of each list (env SYNC_INTERVAL, default 900)")
    _add_retention_flag(daemon)
    daemon.add_argument("--cron", dest="SYNC_CRON", metavar="EXPR",
                        help="a crontab schedule instead of the interval (env SYNC_CRON)")
    daemon.add_argument("--jitter", dest="SYNC_JITTER", metavar="SECONDS",
                        help="random delay added to each run (env SYNC_JITTER, default 30)")
    daemon.add_argument("--http-port", dest="HTTP_PORT", metavar="PORT",
                        help="port of /healthz, /readyz, /metrics (env HTTP_PORT, default 8080)")
    daemon.add_argument("--webhook-port", dest="WEBHOOK_PORT", metavar="PORT",
                        help="serve the webhooks on this port only, apart from the probes and "
                        "/metrics (env WEBHOOK_PORT; default: on HTTP_PORT)")
    daemon.add_argument("--shutdown-grace", dest="SHUTDOWN_GRACE", metavar="SECONDS",
                        help="how long a stop waits for the run in progress (env SHUTDOWN_GRACE, 25)")
    _add_settings_flags(daemon)
    daemon.set_defaults(handler=daemon_command)

    backfill = commands.add_parser(
        "backfill", help="one-shot full pull into the mirror, resumable; pushes only with --push")
    _add_scope_flags(backfill)
    backfill.add_argument("--push", action="store_true", help="also push pending local additions")
    backfill.add_argument("--allow-mass-delete", action="store_true",
                          help="let the backfill remove more than SYNC_MAX_DELETE_FRACTION of a list")
    _add_settings_flags(backfill)
    backfill.set_defaults(handler=backfill_command)

    status = commands.add_parser("status", help="the last run, pending and rejected rows of every list")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    status.add_argument("--all", action="store_true",
                        help="also the domains no longer configured that have recorded runs")
    status.add_argument("--lists", action="store_true",
                        help=f"a line for every list, also past {TABLE_MOST_LISTS} (default: a summary then)")
    status.add_argument("--database-url", dest="DATABASE_URL", metavar="URL",
                        help="PostgreSQL URL of the mirror (env DATABASE_URL)")
    status.set_defaults(handler=status_command)

    prune = commands.add_parser(
        "prune", help="delete change log and run records older than the retention, in small batches")
    _add_retention_flag(prune)
    prune.add_argument("--database-url", dest="DATABASE_URL", metavar="URL",
                       help="PostgreSQL URL of the mirror (env DATABASE_URL)")
    prune.add_argument("--json", action="store_true", help="print one JSON object")
    prune.set_defaults(handler=prune_command)

    migrate_cmd = commands.add_parser("migrate", help="create or update the mirror's schema")
    migrate_cmd.add_argument("--database-url", dest="DATABASE_URL", metavar="URL",
                             help="PostgreSQL URL of the mirror (env DATABASE_URL)")
    migrate_cmd.add_argument("--app-role", metavar="ROLE",
                             help="then grant the applications' role exactly its rights in the schema")
    migrate_cmd.set_defaults(handler=migrate_command)

    grants = commands.add_parser(
        "grants", help="print or apply the least-privilege grants of the worker's and applications' roles")
    grants.add_argument("--app-role", required=True, metavar="ROLE",
                        help="the role applications connect as")
    grants.add_argument("--worker-role", metavar="ROLE",
                        help="the role the worker connects as: also the administrator's setup that "
                        "makes it the schema's owner")
    grants.add_argument("--apply", action="store_true",
                        help="run the statements on DATABASE_URL instead of printing them")
    grants.add_argument("--database-url", dest="DATABASE_URL", metavar="URL",
                        help="PostgreSQL URL of the mirror, with --apply (env DATABASE_URL)")
    grants.set_defaults(handler=grants_command)

    devtools.add_demo(commands)
    devtools.add_bench(commands)
    devtools.add_soak(commands)

    webhook_test = commands.add_parser(
        "webhook-test", help="sign and send sample Mailgun webhooks to an endpoint and check its answers")
    webhook_test.add_argument("--url", required=True,
                              help="the endpoint, e.g. https://sync.example.com/webhooks/mailgun")
    webhook_test.add_argument("--signing-key", dest="MAILGUN_WEBHOOK_SIGNING_KEY", metavar="KEY",
                              help="the webhook signing key (env MAILGUN_WEBHOOK_SIGNING_KEY)")
    webhook_test.add_argument("--domain", metavar="D",
                              help="the sending domain the samples name (default: first of MAILGUN_DOMAINS)")
    webhook_test.add_argument("--recipient", metavar="ADDRESS",
                              help="the address the samples suppress (default: one at example.com)")
    webhook_test.set_defaults(handler=webhook_test_command)

    devtools.add_bench_webhooks(commands)
    devtools.add_bench_scale(commands)
    devtools.add_bench_prune(commands)

    emulator = commands.add_parser(
        "emulator", help="serve the Mailgun suppressions API emulator (for tests and local runs)")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=port_number, default=8025, help="0 picks a free one (default 8025)")
    emulator.add_argument("--api-key", default="key-emulator",
                          help="the key clients must send as HTTP Basic password (user `api`)")
    emulator.add_argument("--domain", action="append", default=[], dest="domains",
                          help="declare a sending domain (repeatable); none: any domain is accepted")
    emulator.add_argument("--seed", type=Path, help='JSON file: {"domains": {D: {"bounces": [...]}}}')
    emulator.add_argument("--latency-ms", type=float, default=0.0,
                          help="added to every API request, to model the round trip")
    emulator.add_argument("--rate-limit", type=int, default=2500,
                          help="requests per window per key before 429 (X-Request-Limit)")
    emulator.add_argument("--generate", action="append", default=[], metavar="LIST=N",
                          help="add N synthetic records to a list of the first domain (repeatable)")
    emulator.set_defaults(handler=emulator_command)
    _VOCABULARY.update(word.lower() for word in _choices(parser))
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k.isupper()}


def load_settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    # --domain narrows to those domains (validated as MAILGUN_DOMAINS is).
    domains = ",".join(args.domains) if args.domains else None
    settings = Settings.from_env(env, **_overrides(args), MAILGUN_DOMAINS=domains)
    if not settings.domains and not settings.config_file:
        raise ConfigError("MAILGUN_DOMAINS", "no domain to sync: set MAILGUN_DOMAINS or SYNC_CONFIG, "
                                             "or pass --domain")
    if settings.config_file:  # a malformed file or schedule fails before anything opens
        config = read_sync_config(settings.config_file, default_api_base=settings.api_base)
        for plan in config.domains:
            build_trigger(settings, plan)
        if config.discover is not None:
            build_trigger(settings, DomainPlan("[discover]", "", interval=config.discover.interval,
                                               cron=config.discover.cron))
    return settings


def selected_lists(args: argparse.Namespace) -> list[SuppressionList] | None:
    """The lists --list narrows every domain to; None: each domain's own."""
    return [SuppressionList(name) for name in args.lists] if args.lists else None


async def domain_plans(args: argparse.Namespace, settings: Settings, resources: Resources) -> Planned:
    return await plan_domains(settings, resources.mailgun_for, only=args.domains or (),
                              lists=selected_lists(args), memory=resources.store)


async def reconcile_plans(plans: Sequence[DomainPlan], resources: Resources,
                          make: Callable[[MailgunClient], Reconciler]) -> list[ListResult]:
    """One run over every domain, each through its own region's client."""
    run_id = uuid.uuid4()
    results: list[ListResult] = []
    for plan in plans:
        results += await make(resources.mailgun_for(plan.api_base)).run(run_id, [plan.name], plan.lists)
    return results


async def require_schema(pool: asyncpg.Pool) -> None:
    missing = await pending_migrations(pool)
    if missing:
        raise SyncError(f"the mirror's schema is not up to date (missing migrations {missing}): "
                        "run `mailgun-sync migrate` first")


async def run_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = load_settings(args, env)
    options = ReconcileOptions(dry_run=args.dry_run, allow_mass_delete=args.allow_mass_delete,
                               max_delete_fraction=settings.max_delete_fraction,
                               pull_ranges=settings.pull_ranges)
    async with open_resources(settings) as resources:
        await require_schema(resources.pool)
        planned = await domain_plans(args, settings, resources)
        results = await reconcile_plans(
            planned.domains, resources, lambda client: Reconciler(resources.store, client, options))
        if not args.domains and not planned.failures:  # every domain synced is known
            await warn_of_unsynced_rows(resources.store, [plan.name for plan in planned.domains])
    return print_results(results, planned.failures, as_json=args.json, dry_run=args.dry_run)


DRY_RUN_NOTICE = "dry run: nothing was changed; the counts are what a run would do now\n"


def print_results(results: Sequence[ListResult], failures: Sequence[str], *, as_json: bool,
                  dry_run: bool = False) -> int:
    """Print the report; the exit code: 1 if a list did not succeed or a region's domains could
    not be discovered."""
    ok = all(r.succeeded for r in results) and not failures
    if as_json:
        payload = {"dry_run": dry_run, "ok": ok, "results": [r.as_json() for r in results],
                   "discovery_errors": list(failures)}
        sys.stdout.write(orjson.dumps(payload).decode() + "\n")
    else:
        sys.stdout.write((DRY_RUN_NOTICE if dry_run else "") + render_table(results)
                         + "".join(f"error: {f}\n" for f in failures))
    return EXIT_OK if ok else EXIT_FAILED


async def daemon_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = load_settings(args, env)
    build_trigger(settings)  # a malformed schedule fails before anything opens
    metrics = Metrics()
    async with open_resources(settings, observer=metrics, serving=True) as resources:
        await require_schema(resources.pool)
        async def planner() -> Planned:
            return await domain_plans(args, settings, resources)

        await serve(settings, resources, metrics, planner)
    return EXIT_OK


async def backfill_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = load_settings(args, env)
    options = ReconcileOptions(allow_mass_delete=args.allow_mass_delete,
                               max_delete_fraction=settings.max_delete_fraction)
    async with open_resources(settings) as resources:
        await require_schema(resources.pool)
        planned = await domain_plans(args, settings, resources)
        progress = Progress(sys.stdout)
        results = await reconcile_plans(planned.domains, resources, lambda client: Backfiller(
            resources.store, client, options, push=args.push, progress=progress))
    return print_results(results, planned.failures, as_json=False)


def configured_domains(env: Mapping[str, str]) -> list[str]:
    """The domains named in MAILGUN_DOMAINS and SYNC_CONFIG (discovery would ask Mailgun, which
    `status` does not)."""
    named = list(domain_names(env.get("MAILGUN_DOMAINS", "")))
    if env.get("SYNC_CONFIG"):
        config = read_sync_config(env["SYNC_CONFIG"], default_api_base=US_API_BASE)
        named += [plan.name for plan in config.domains]
    return named


async def status_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    url = require_database_url(env, args.DATABASE_URL)
    configured = configured_domains(env)
    async with open_pool(url, max_size=2) as pool:
        await require_schema(pool)
        store = MirrorStore(pool)
        regions = await discovery_status(store)
        synced = configured + [name for region in regions for name in region["domains"]]
        # Without a configuration to tell, every domain with a recorded run is shown.
        report = await list_status(store, synced, every_domain=args.all or not configured)
        unsynced = await store.pending_elsewhere({row["domain"] for row in report})
    if args.json:
        sys.stdout.write(orjson.dumps({"lists": report, "discovery": regions,
                                       "unsynced_pending": unsynced}).decode() + "\n")
    else:
        table = render_status(report) if args.lists or len(report) <= TABLE_MOST_LISTS \
            else render_summary(report)
        sys.stdout.write(table + render_unsynced(unsynced) + render_discovery(regions))
    return EXIT_OK


async def prune_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    merged = {**env, **{k: v for k, v in _overrides(args).items() if v is not None}}
    days = retention_days(merged)
    url = require_database_url(env, args.DATABASE_URL)
    async with open_pool(url, max_size=1) as pool:
        await require_schema(pool)
        report = await prune(pool, days)
    sys.stdout.write(orjson.dumps(report.as_json()).decode() + "\n" if args.json
                     else render_prune(report))
    return EXIT_OK


async def migrate_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    url = require_database_url(env, args.DATABASE_URL)
    if args.app_role is not None:
        role_identifier(args.app_role, "--app-role")  # a malformed name fails before anything opens
    async with open_pool(url, max_size=1) as pool:
        applied = await migrate(pool, app_role=args.app_role)
    print(f"applied migrations {applied}" if applied else "schema already up to date")
    if args.app_role is not None:
        print(f"granted role {args.app_role} the applications' rights in schema mailgun")
    return EXIT_OK


async def grants_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    script = grant_statements(args.app_role, args.worker_role)
    if not args.apply:
        sys.stdout.write(f"BEGIN;\n\n{script}\nCOMMIT;\n")
        return EXIT_OK
    url = require_database_url(env, args.DATABASE_URL)
    async with open_pool(url, max_size=1) as pool, wrap_db_errors("granting the roles' rights"), \
            pool.acquire() as connection, connection.transaction():
        await connection.execute(script)
    if args.worker_role is not None:
        print(f"role {args.worker_role} owns schema mailgun and everything in it")
    print(f"granted role {args.app_role} the applications' rights in schema mailgun")
    return EXIT_OK


def _not_an_endpoint() -> ConfigError:
    return ConfigError("--url", f"is not an {' or '.join(_URL_SCHEMES)} URL; give the endpoint, "
                                "such as https://sync.example.com/webhooks/mailgun")


def endpoint_url(text: str) -> None:
    """Refuse, as a usage error, a --url no request could be sent to."""
    not_a_url = _not_an_endpoint()
    try:
        url = urlsplit(text)
    except ValueError:  # an unclosed [IPv6] bracket
        raise not_a_url from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise not_a_url
    try:
        port = url.port
    except ValueError:  # out of range, or not a number
        port = 0
    if port == 0:
        given = url.netloc.rpartition(":")[2]
        # Digits are shown (no secret is a port number); anything else is not.
        shown = f"port {given} is" if given.isascii() and given.isdigit() else "its port is"
        raise ConfigError("--url", f"{shown} not a port number from 1 to 65535")


async def webhook_test_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from worker.webhooks.selftest import TEST_RECIPIENT, render, run_webhook_test

    key = secret(env, "MAILGUN_WEBHOOK_SIGNING_KEY", args.MAILGUN_WEBHOOK_SIGNING_KEY).strip()
    if not key:
        raise ConfigError("MAILGUN_WEBHOOK_SIGNING_KEY", "is not set; give the webhook signing key, or "
                                                         "MAILGUN_WEBHOOK_SIGNING_KEY_FILE naming its file")
    domain = args.domain or next(iter(domain_names(env.get("MAILGUN_DOMAINS", ""))), None)
    if not domain:
        raise ConfigError("--domain", "no domain for the samples: pass --domain or set MAILGUN_DOMAINS")
    endpoint_url(args.url)
    try:
        checks = await run_webhook_test(args.url, key, domain, args.recipient or TEST_RECIPIENT)
    except aiohttp.InvalidURL:  # what the HTTP client reads more strictly than urlsplit
        raise _not_an_endpoint() from None
    if all(check.status is None for check in checks):  # nothing to compare: one line, not six
        raise SyncError(f"--url: the endpoint answered none of the samples: "
                        f"{checks[0].answer.removeprefix('no answer: ')}")
    sys.stdout.write(render(args.url, checks))
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAILED


async def emulator_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = EmulatorSettings(
        latency_s=args.latency_ms / 1000, rate_limit=args.rate_limit,
        auto_create_domains=not args.domains)
    emulator = MailgunEmulator(api_key=args.api_key, domains=args.domains, settings=settings)
    if args.seed is not None:
        try:
            seed = orjson.loads(args.seed.read_bytes())
            if not isinstance(seed, dict):
                raise ValueError('expected an object {"domains": {...}}')
            emulator.load_seed(seed)
        except (OSError, orjson.JSONDecodeError, ValueError, TypeError, AttributeError) as exc:
            raise ConfigError("--seed", f"cannot load {args.seed}: {exc}") from exc
    for spec in args.generate:
        name, _, count = spec.partition("=")
        try:
            emulator.generate(args.domains[0] if args.domains else "mg.example.com",
                              SuppressionList.parse(name), int(count))
        except ValueError:
            raise ConfigError("--generate", f"{spec!r} is not LIST=N, e.g. bounces=1000000") from None
    gc.freeze()  # the seeded records live as long as the process
    try:
        base_url = await emulator.start(args.host, args.port)
    except OSError as exc:
        await emulator.stop()
        setting = "--host" if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL \
            else "--port"
        raise StartupError.listening(exc, setting, args.host, args.port) from None
    log.info("emulator_started", base_url=base_url, domains=args.domains or "any")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await emulator.stop()
    return EXIT_OK


async def cli(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run one command; every error it raises on purpose becomes one line on stderr."""
    env = os.environ if env is None else env
    try:
        args = build_parser().parse_args(argv)
        configure_logging(level=args.log_level or args.default_log_level)
        handler: Handler = args.handler
        return await handler(args, env)
    except ConfigError as exc:
        # Nothing given on the command line is shown back: it may be a secret given to the wrong flag.
        print(f"mailgun-sync: {exc.setting}: {shown_usage_error(exc.problem, argv)}", file=sys.stderr)
        return EXIT_USAGE
    except SyncError as exc:
        print(f"mailgun-sync: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        # The system refused something no setting names (a full disk under stdout, say): one
        # line, as for every other failure, not a traceback.
        print(f"mailgun-sync: {os_error(exc)}", file=sys.stderr)
        return EXIT_FAILED


def os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or type(exc).__name__}{where}"


async def interruptible(argv: Sequence[str]) -> int:
    """cli(argv), stopped by SIGINT or SIGTERM alike (a CronJob's pod gets SIGTERM): the command is
    cancelled (a run or a backfill logs the list it was in the middle of as failed, its unconfirmed
    rows pending), one log line says so, and the exit code is the shell's for the signal. The
    daemon and the emulator take both signals themselves while they serve: a stop, exit 0."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is None:  # not run as a task: nothing to cancel
        return await cli(argv)
    received: list[signal.Signals] = []

    def interrupt(sig: signal.Signals) -> None:
        received.append(sig)
        task.cancel()  # a second signal cuts the first one's clean-up short

    for sig in EXIT_INTERRUPTED:
        loop.add_signal_handler(sig, interrupt, sig)
    try:
        code = await cli(argv)
    except asyncio.CancelledError:
        if not received:
            raise
    finally:
        for sig in EXIT_INTERRUPTED:
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
    if not received:
        return code
    code = EXIT_INTERRUPTED[received[0]]
    log.warning("interrupted", signal=received[0].name, exit_code=code, detail="stopped before the end")
    return code


def main(argv: Sequence[str] | None = None) -> None:
    try:
        # A pull allocates thousands of short-lived objects per page; with the default thresholds
        # the collector runs every 700 allocations and costs about a third of the pull's CPU. What
        # exists now (modules, classes) lives as long as the process: keep it out of collections.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        code = asyncio.run(interruptible(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        # Ctrl-C before the command took signals over (or after it gave them back): nothing had
        # started, or all was done; no traceback.
        code = EXIT_INTERRUPTED[signal.SIGINT]
    try:
        sys.stdout.flush()
    except OSError as exc:  # stdout a closed pipe or a full disk; said once
        if code == EXIT_OK:
            print(f"mailgun-sync: cannot write the output: {os_error(exc)}", file=sys.stderr)
            code = EXIT_FAILED
    finally:
        # Nothing is left for the interpreter's own flush at exit, which would print a traceback.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)
