"""`mailgun-sync demo`: the whole product on one machine, needing no key and no database.

It starts the Mailgun emulator seeded with realistic lists (the API documents' own sample records
among them) and an embedded PostgreSQL, mirrors the lists, then changes both sides the way real
life does (Mailgun gains and loses suppressions, the application inserts its own, one of them
invalid) and runs the reconcile that brings them back in step, printing what it did.
"""

from __future__ import annotations

import random
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from worker.database import open_pool
from worker.devtools.embedded import embedded_postgres
from worker.devtools.sql import queries
from worker.emulator import MailgunEmulator
from worker.emulator.recorded import RECORDED_BOUNCES, RECORDED_UNSUBSCRIBES
from worker.errors import StartupError
from worker.mailgun import MailgunClient
from worker.mailgun.retry import RetryPolicy
from worker.migrate import migrate
from worker.reconcile import ListResult, ReconcileOptions, Reconciler
from worker.records import SYNCED_LISTS, SuppressionList
from worker.report import render_table
from worker.store import MirrorStore

DOMAIN = "mg.demo.example"
API_KEY = "key-demo-not-a-secret"

# The sample records of the two API documents the product was specified from.
SEED_SAMPLES: dict[str, list[dict[str, Any]]] = {
    "bounces": [
        {"code": 550, "created_at": "Fri, 21 Oct 2011 11:02:55 GMT",
         "error": "Message was not accepted -- invalid mailbox. Local mailbox 'serobnic@mail.ru "
                  "is unavailable: user not found", "address": "'serobnic@mail.ru"},
        {"address": "alice@example.com", "code": "550", "error": "Message was not accepted",
         "created_at": "Fri, 21 Oct 2011 11:02:55 GMT"},
        {"address": "bob@example.com", "code": "550", "error": "Error description",
         "created_at": "Thu, 13 Oct 2011 18:02:00 UTC"},
    ],
    "unsubscribes": [
        {"address": "alice@example.com", "tags": ["some tag"], "created_at": "Thu, 13 Oct 2011 18:02:00 UTC"},
        {"address": "bob@example.com", "tags": ["*"]},
    ],
    "complaints": [
        {"address": "baz@example.com", "created_at": "Fri, 21 Oct 2011 11:02:55 GMT"},
    ],
}

_FIRST = ["ana", "ben", "chloe", "dev", "emma", "femi", "grace", "hugo", "ines", "jon", "kai", "lena"]
_LAST = ["smith", "okafor", "garcia", "tanaka", "muller", "rossi", "novak", "silva", "kim", "ali"]
_HOSTS = ["gmail.com", "yahoo.co.uk", "outlook.com", "web.de", "example.org", "mail.ru"]
_BOUNCE_ERRORS = [("550", "5.1.1 The email account that you tried to reach does not exist"),
                  ("552", "5.2.2 Mailbox full"), ("554", "5.7.1 Message rejected as spam")]


def _people(rng: random.Random, count: int) -> Iterator[str]:
    seen: set[str] = set()
    while len(seen) < count:
        address = f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}{rng.randint(1, 999)}@{rng.choice(_HOSTS)}"
        if address not in seen:
            seen.add(address)
            yield address


def demo_seed(rng: random.Random) -> dict[str, list[dict[str, Any]]]:
    lists: dict[str, list[dict[str, Any]]] = {k: list(v) for k, v in SEED_SAMPLES.items()}
    # Records as Mailgun really returned them, an unsubscribe with an empty address among them.
    lists["bounces"] += RECORDED_BOUNCES
    lists["unsubscribes"] += RECORDED_UNSUBSCRIBES
    for address in _people(rng, 240):
        code, error = rng.choice(_BOUNCE_ERRORS)
        lists["bounces"].append({"address": address, "code": code, "error": error})
    for address in _people(rng, 120):
        lists["unsubscribes"].append({"address": address, "tags": rng.choice([["*"], ["newsletter"]])})
    for address in _people(rng, 30):
        lists["complaints"].append({"address": address})
    return lists


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")


async def _reconcile(store: MirrorStore, client: MailgunClient) -> list[ListResult]:
    reconciler = Reconciler(store, client, ReconcileOptions())
    return await reconciler.run(uuid.uuid4(), [DOMAIN], list(SYNCED_LISTS))


async def _change_both_sides(emulator: MailgunEmulator, pool: asyncpg.Pool, rng: random.Random) -> None:
    remote_bounces = emulator.records(DOMAIN, "bounces")
    gone = [r["address"] for r in rng.sample(remote_bounces[3:], 4)]
    for address in gone:
        emulator.remove(DOMAIN, SuppressionList.BOUNCES, address)
    emulator.seed(DOMAIN, "bounces", [{"address": a, "code": "550", "error": "5.1.1 no such user"}
                                      for a in _people(random.Random(7), 5)])
    emulator.seed(DOMAIN, "bounces", [{**SEED_SAMPLES["bounces"][2], "code": "554",
                                       "error": "5.7.1 rejected by policy"}])
    _say(f"   Mailgun: 5 new bounces, {len(gone)} bounces deleted, bob@example.com's code changed")
    await pool.execute(queries()["demo_local_additions"], DOMAIN)
    _say("   Application: INSERTed 3 bounces, 1 unsubscribe and 1 complaint into the mirror;"
         " one address is invalid")


def _usable_directory(path: Path) -> None:
    """--keep's directory exists (made if need be) and takes files, or one line says why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise StartupError(f"--keep: cannot keep the database in {path}: "
                           f"{exc.strerror or type(exc).__name__}") from None


async def run_demo(*, keep: Path | None = None) -> int:
    rng = random.Random(2026)
    if keep is not None:
        _usable_directory(keep)
    with ExitStack() as stack:
        data_dir = keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mailgun-sync-demo-")))
        database_url = stack.enter_context(embedded_postgres(data_dir))
        async with MailgunEmulator(api_key=API_KEY, domains=[DOMAIN]) as emulator, \
                open_pool(database_url) as pool, aiohttp.ClientSession() as session:
            for kind, records in demo_seed(rng).items():
                emulator.seed(DOMAIN, kind, records)
            _say(f"Mailgun emulator: {emulator.base_url}  (domain {DOMAIN})")
            _say(f"Embedded PostgreSQL: {data_dir}")
            await migrate(pool)
            store = MirrorStore(pool)
            client = MailgunClient(session, api_base=str(emulator.base_url), api_key=API_KEY,
                                   retry=RetryPolicy(max_attempts=3, backoff_max=1.0))

            _say("\n1. First run: the mirror is empty, every list is pulled into it.\n")
            _say(render_table(await _reconcile(store, client)))

            _say("2. Meanwhile, both sides change:")
            await _change_both_sides(emulator, pool, rng)

            _say("\n3. Second run brings them back in step:\n")
            results = await _reconcile(store, client)
            _say(render_table(results))
            _say("What changed, by side (from mailgun.changes):")
            for row in await pool.fetch(queries()["demo_latest_changes"]):
                side = "Mailgun" if row["action"] == "push" else "mirror "
                detail = f"  ({row['detail']})" if row["detail"] else ""
                _say(f"   {side}  {row['action']:<7} {row['list']:<13} {row['address']}{detail}")
            pending = await pool.fetchval(queries()["demo_count_pending"])
            _say(f"\nPending rows left: {pending}; the invalid address stays in the mirror as rejected,"
                 " with its reason in sync_error.")
            again = await _reconcile(store, client)
            changed = sum(r.changes() for r in again)
            _say(f"\n4. A third run finds both sides in step: {changed} changes.")
    return 0 if all(r.succeeded for r in results + again) and changed == 0 else 1
