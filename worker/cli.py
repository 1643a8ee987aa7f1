"""The `mailgun-sync` command: argument parsing, the one error boundary, and exit codes.

Exit codes: 0 success, 1 a sync did not end well, 2 a setting or argument is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson

from worker import __version__
from worker.emulator import EmulatorSettings, MailgunEmulator
from worker.errors import ConfigError, SyncError
from worker.logs import configure_logging, get_logger

log = get_logger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailgun-sync",
        description="Keep Mailgun's suppression lists and a PostgreSQL mirror in step.")
    parser.add_argument("--version", action="version", version=f"mailgun-sync {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    emulator = commands.add_parser(
        "emulator", help="serve the Mailgun suppressions API emulator (for tests and local runs)")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8025)
    emulator.add_argument("--api-key", default="key-emulator",
                          help="the key clients must send as HTTP Basic password (user `api`)")
    emulator.add_argument("--domain", action="append", default=[], dest="domains",
                          help="declare a sending domain (repeatable); none: any domain is accepted")
    emulator.add_argument("--seed", type=Path, help='JSON file: {"domains": {D: {"bounces": [...]}}}')
    emulator.add_argument("--latency-ms", type=float, default=0.0,
                          help="added to every API request, to model the round trip")
    emulator.add_argument("--rate-limit", type=int, default=2500,
                          help="requests per window per key before 429 (X-Request-Limit)")
    return parser


async def serve_emulator(args: argparse.Namespace) -> int:
    settings = EmulatorSettings(
        latency_s=args.latency_ms / 1000, rate_limit=args.rate_limit,
        auto_create_domains=not args.domains)
    emulator = MailgunEmulator(api_key=args.api_key, domains=args.domains, settings=settings)
    if args.seed is not None:
        try:
            emulator.load_seed(orjson.loads(args.seed.read_bytes()))
        except (OSError, orjson.JSONDecodeError, ValueError) as exc:
            raise ConfigError("--seed", f"cannot load {args.seed}: {exc}") from exc
    base_url = await emulator.start(args.host, args.port)
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


async def cli(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(level=args.log_level)
    try:
        if args.command == "emulator":
            return await serve_emulator(args)
        parser.error(f"unknown command {args.command}")
    except ConfigError as exc:
        print(f"mailgun-sync: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SyncError as exc:
        print(f"mailgun-sync: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(cli(sys.argv[1:] if argv is None else argv)))
