"""The tooling's commands: `demo`, `bench`, `soak`, `bench-webhooks`, `bench-scale` and
`bench-prune`, each registered on the `mailgun-sync` parser with its handler. What a handler runs
is imported when it runs: the worker's own commands never load it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeAlias

import orjson

from worker.cli import EXIT_FAILED, EXIT_OK
from worker.settings import check_database_url

# The `add_subparsers` of the `mailgun-sync` parser.
Commands: TypeAlias = "argparse._SubParsersAction[Any]"


def _server(args: argparse.Namespace) -> str | None:
    """--database-url, the server a throwaway database is made on, checked as DATABASE_URL is."""
    url: str | None = args.database_url
    if url:
        check_database_url(url, "--database-url")
    return url


def _add_server_flags(parser: argparse.ArgumentParser, whose: str) -> None:
    parser.add_argument("--database-url", metavar="URL",
                        help=f"a server to create {whose} own database on (default: local or embedded)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _report(report: dict[str, Any], render: Callable[[dict[str, Any]], str], args: argparse.Namespace,
            *, ok: bool) -> int:
    """Print the report, as one JSON object with --json; the exit code."""
    sys.stdout.write(orjson.dumps(report).decode() + "\n" if args.json else render(report))
    return EXIT_OK if ok else EXIT_FAILED


def add_demo(commands: Commands) -> None:
    demo = commands.add_parser(
        "demo", help="run a full reconcile against the emulator and an embedded PostgreSQL")
    demo.add_argument("--keep", type=Path, metavar="DIR",
                      help="keep the embedded database in DIR instead of a temporary directory")
    demo.set_defaults(handler=demo_command, default_log_level="WARNING")


async def demo_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from worker.devtools.demo import run_demo

    return await run_demo(keep=args.keep)


def add_bench(commands: Commands) -> None:
    bench = commands.add_parser(
        "bench", help="measure a reconcile of N records against the hand-written baseline")
    bench.add_argument("--records", type=int, default=100_000, metavar="N",
                       help="bounces at the emulator (default 100000)")
    bench.add_argument("--pending", type=int, metavar="N",
                       help="pending local additions to push (default 1 %% of --records)")
    bench.add_argument("--deletions", type=int, default=0, metavar="N",
                       help="also have the application delete N synced rows, deleted at Mailgun by the run")
    bench.add_argument("--page-latency-ms", type=float, default=0.0, metavar="L",
                       help="added to every request to the emulator, as a round trip to Mailgun")
    bench.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                       help="also run the hand-written baseline (default: up to 200000 records)")
    _add_server_flags(bench, "the benchmark's")
    bench.set_defaults(handler=bench_command)


async def bench_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from worker.devtools.benchmark.run import render, run_benchmark

    report = await run_benchmark(
        records=args.records, pending=args.pending, page_latency_ms=args.page_latency_ms,
        baseline=args.baseline, database_url=_server(args), deletions=args.deletions)
    return _report(report, render, args, ok=True)


def add_soak(commands: Commands) -> None:
    soak = commands.add_parser(
        "soak", help="the daemon against the emulator with failing requests: convergence and drift")
    soak.add_argument("--seconds", type=float, default=600.0, help="how long (default 600)")
    soak.add_argument("--failure-rate", type=float, default=0.05, help="share of requests failing")
    soak.add_argument("--records", type=int, default=20_000, help="bounces at the emulator")
    _add_server_flags(soak, "the soak's")
    soak.set_defaults(handler=soak_command)


async def soak_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from worker.devtools.soak import render, run_soak

    report = await run_soak(seconds=args.seconds, failure_rate=args.failure_rate,
                            records=args.records, database_url=_server(args))
    return _report(report, render, args, ok=report["converged"])


def add_bench_webhooks(commands: Commands) -> None:
    bench_webhooks = commands.add_parser(
        "bench-webhooks", help="measure the daemon absorbing a burst of signed webhooks")
    bench_webhooks.add_argument("--events", type=int, default=20_000, metavar="N",
                                help="webhooks to send (default 20000)")
    bench_webhooks.add_argument("--rate", type=float, default=1000.0, metavar="R",
                                help="webhooks per second to send at (default 1000)")
    bench_webhooks.add_argument("--connections", type=int, default=100, metavar="C",
                                help="most requests in flight at once (default 100)")
    bench_webhooks.add_argument("--slow-runs", type=int, default=0, metavar="N",
                                help="also take the burst while N lists are being pulled, slowly")
    bench_webhooks.add_argument("--page-delay", type=float, default=4.0, metavar="S",
                                help="seconds the emulator takes for each page of those pulls (default 4)")
    bench_webhooks.add_argument("--flood", type=float, default=0.0, metavar="R",
                                help="also take the burst alongside R badly signed requests a second")
    _add_server_flags(bench_webhooks, "the benchmark's")
    bench_webhooks.set_defaults(handler=bench_webhooks_command)


async def bench_webhooks_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from worker.devtools.benchmark.webhooks import render, run_benchmark

    report = await run_benchmark(
        events=args.events, rate=args.rate, connections=args.connections,
        database_url=_server(args), slow_runs=args.slow_runs, page_delay=args.page_delay,
        flood=args.flood)
    return _report(report, render, args, ok=report["ok"])


def add_bench_scale(commands: Commands) -> None:
    scale = commands.add_parser(
        "bench-scale", help="measure daemon replicas sharing the lists of many domains")
    scale.add_argument("--domains", type=int, default=20, metavar="N",
                       help="domains in the account, found by discovery (default 20)")
    scale.add_argument("--replicas", type=int, default=3, metavar="R", help="daemons (default 3)")
    scale.add_argument("--interval", type=float, default=6.0, metavar="S",
                       help="SYNC_INTERVAL of every list (default 6)")
    scale.add_argument("--seconds", type=float, default=60.0, metavar="T",
                       help="how long the replicas run (default 60)")
    scale.add_argument("--kill-one", action="store_true",
                       help="SIGKILL one replica halfway, and measure the hand-over")
    scale.add_argument("--rate-limit", type=int, metavar="N",
                       help="the emulator's request budget per 30 s window (default: none)")
    _add_server_flags(scale, "the benchmark's")
    scale.set_defaults(handler=bench_scale_command)


async def bench_scale_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from worker.devtools.benchmark.scale import render, run_benchmark

    report = await run_benchmark(
        domains=args.domains, replicas=args.replicas, interval=args.interval, seconds=args.seconds,
        kill_one=args.kill_one, rate_limit=args.rate_limit, database_url=_server(args))
    return _report(report, render, args, ok=report["ok"])


def add_bench_prune(commands: Commands) -> None:
    bench_prune = commands.add_parser(
        "bench-prune", help="measure pruning a large change log, and a writer's latency meanwhile")
    bench_prune.add_argument("--old", type=int, default=5_000_000, metavar="N",
                             help="change rows past the 30-day retention (default 5000000)")
    bench_prune.add_argument("--fresh", type=int, metavar="N",
                             help="change rows within it, kept (default a tenth of --old)")
    bench_prune.add_argument("--runs", type=int, metavar="N",
                             help="run records over 61 days (default a hundredth of --old)")
    bench_prune.add_argument("--rate", type=float, default=200.0, metavar="R",
                             help="the concurrent writer's inserts per second (default 200)")
    bench_prune.add_argument("--baseline-seconds", type=float, default=10.0, metavar="S",
                             help="how long the writer runs alone first (default 10)")
    _add_server_flags(bench_prune, "the benchmark's")
    bench_prune.set_defaults(handler=bench_prune_command)


async def bench_prune_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from worker.devtools.benchmark.prune import render, run_benchmark

    report = await run_benchmark(
        old=args.old, fresh=args.fresh, runs=args.runs, rate=args.rate,
        baseline_seconds=args.baseline_seconds, database_url=_server(args))
    return _report(report, render, args, ok=report["ok"])
