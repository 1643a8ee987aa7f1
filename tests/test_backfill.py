"""`mailgun-sync backfill`: a full pull committed page by page, pull-only unless asked to push,
resumable after a kill or a failed page with the same end result, progress lines, and the list's lock."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import pty
import re
import signal
import struct
import sys
import termios
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.support.account import API_KEY, DOMAIN
from tests.support.mirror import changes, insert_row, rows
from tests.support.process import run_killed_once
from tests.support.replicas import FAKETIME
from worker.backfill import Backfiller, Progress
from worker.emulator import Fault
from worker.mailgun.retry import RetryPolicy
from worker.reconcile import ReconcileOptions
from worker.records import ListRef, SuppressionList, format_timestamp, parse_timestamp
from worker.retention import prune

BOUNCES = SuppressionList.BOUNCES
COMPLAINTS = SuppressionList.COMPLAINTS
FIRST_CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)
DATA = "domain, address, code, error, created_at, sync_state"


@pytest.fixture(autouse=True)
async def _no_backfill_left(pool):
    """The mirror fixture empties the mirror's tables; a backfill's own tables are emptied here."""
    await pool.execute("TRUNCATE mailgun.backfill_pages, mailgun.backfill_progress")


def seed_bounces(emulator, count: int, prefix: str = "bounced") -> list[str]:
    """`count` bounces in Mailgun, each with its own code, error and time; returns their addresses
    in the order Mailgun lists them."""
    found = [f"{prefix}{i:05}@example.com" for i in range(count)]
    emulator.seed(DOMAIN, BOUNCES, [
        {"address": a, "code": "554" if i % 3 == 0 else "550", "error": f"mailbox {i} unavailable",
         "created_at": format_timestamp(FIRST_CREATED + timedelta(seconds=i))}
        for i, a in enumerate(found)])
    assert [r["address"] for r in emulator.records(DOMAIN, BOUNCES)] == found
    return found


def remote_bounces(emulator) -> dict[str, tuple[str, str, datetime]]:
    return {r["address"]: (r["code"], r["error"], parse_timestamp(r["created_at"]))
            for r in emulator.records(DOMAIN, BOUNCES)}


def mirror_bounces(mirror: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str, datetime]]:
    return {a: (r["code"], r["error"], r["created_at"]) for a, r in mirror.items()}


async def data_columns(pool) -> list[tuple[Any, ...]]:
    """The bounces mirror without its bookkeeping times, which differ from one run to the next."""
    return [tuple(r) for r in await pool.fetch(f"SELECT {DATA} FROM mailgun.bounces ORDER BY address")]


async def committed(pool, kind: SuppressionList = BOUNCES) -> dict[str, Any] | None:
    row = await pool.fetchrow("SELECT last_address, pages, records FROM mailgun.backfill_progress"
                              " WHERE domain = $1 AND list = $2", DOMAIN, kind.value)
    return dict(row) if row else None


async def committed_addresses(pool) -> list[str]:
    return [r["address"] for r in await pool.fetch(
        "SELECT address FROM mailgun.backfill_pages WHERE domain = $1 AND list = 'bounces'"
        " ORDER BY address", DOMAIN)]


async def backfill_rows(pool) -> int:
    return await pool.fetchval(
        "SELECT (SELECT count(*) FROM mailgun.backfill_pages)"
        " + (SELECT count(*) FROM mailgun.backfill_progress)")


def backfiller(store, client, *, push: bool = False, progress: Progress | None = None) -> Backfiller:
    return Backfiller(store, client, ReconcileOptions(), push=push,
                      progress=progress or Progress(io.StringIO()))


def gets(emulator, since: int = 0) -> list[dict[str, str]]:
    """The queries of the list reads Mailgun received, from request number `since` on; the
    `page=last` read that confirms where the list ends is left out."""
    return [r.query for r in list(emulator.requests)[since:]
            if r.method == "GET" and r.query.get("page") != "last"]


def posted_addresses(emulator) -> list[str]:
    return [item["address"] for r in emulator.requests if r.method == "POST" for item in r.json()]


async def wait_until_unlocked(pool) -> None:
    """A killed worker's lock goes with its connection; wait for PostgreSQL to notice."""
    deadline = asyncio.get_running_loop().time() + 10
    while await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"):
        assert asyncio.get_running_loop().time() < deadline, "the killed worker's lock was never released"
        await asyncio.sleep(0.02)


# ---- a complete backfill -------------------------------------------------------------------------


async def test_backfill_pulls_the_whole_list_into_an_empty_mirror_as_synced_rows(
        pool, emulator, store, make_client):
    seed_bounces(emulator, 2345)

    result = await backfiller(store, make_client(page_limit=100)).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (result.status, result.pulled, result.inserted, result.removed) == ("ok", 2345, 2345, 0)
    mirror = await rows(pool, BOUNCES)
    assert mirror_bounces(mirror) == remote_bounces(emulator)
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}
    assert {r["domain"] for r in mirror.values()} == {DOMAIN}
    # 24 pages of records, then the empty page that ends the list.
    assert len(gets(emulator)) == 25
    assert await backfill_rows(pool) == 0
    assert sorted(await changes(pool)) == sorted(("bounces", a, "insert") for a in mirror)


async def test_backfill_is_pull_only_and_pushes_pending_rows_only_when_asked(
        pool, emulator, store, make_client):
    seed_bounces(emulator, 2345)
    await insert_row(pool, BOUNCES, DOMAIN, "local.addition@example.net", code="551", error="moved")

    pulled = await backfiller(store, make_client(page_limit=100)).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (pulled.status, pulled.inserted, pulled.pushed) == ("ok", 2345, 0)
    assert posted_addresses(emulator) == []
    assert "local.addition@example.net" not in remote_bounces(emulator)
    mirror = await rows(pool, BOUNCES)
    assert len(mirror) == 2346
    assert mirror["local.addition@example.net"]["sync_state"] == "pending"
    assert await backfill_rows(pool) == 0

    pushed = await backfiller(store, make_client(page_limit=100), push=True).reconcile(
        uuid.uuid4(), DOMAIN, BOUNCES)

    assert (pushed.status, pushed.pulled, pushed.inserted, pushed.pushed) == ("ok", 2345, 0, 1)
    assert posted_addresses(emulator) == ["local.addition@example.net"]
    assert remote_bounces(emulator)["local.addition@example.net"][:2] == ("551", "moved")
    mirror = await rows(pool, BOUNCES)
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}
    assert mirror_bounces(mirror) == remote_bounces(emulator)
    assert await backfill_rows(pool) == 0


async def test_backfill_applies_the_pull_like_a_run_updating_and_removing_synced_rows(
        pool, emulator, store, make_client):
    found = seed_bounces(emulator, 300)
    await insert_row(pool, BOUNCES, DOMAIN, found[0], state="synced", synced_at=AN_HOUR_AGO,
                     code="550", error="stale", created_at=FIRST_CREATED)
    await insert_row(pool, BOUNCES, DOMAIN, "gone@example.com", state="synced", synced_at=AN_HOUR_AGO)

    result = await backfiller(store, make_client(page_limit=100)).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (result.status, result.inserted, result.updated, result.removed) == ("ok", 299, 1, 1)
    assert mirror_bounces(await rows(pool, BOUNCES)) == remote_bounces(emulator)


# ---- resuming ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_killed_backfill_resumes_from_its_last_committed_page_and_ends_as_an_uninterrupted_one(
        pool, emulator, database_url, store, make_client):
    found = seed_bounces(emulator, 5000)
    # Slow every read so the worker can be killed between two pages (it reads 1000 records a page).
    emulator.inject(Fault(action="delay", delay_s=0.3, times=None, method="GET"))
    env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
           "MAILGUN_DOMAINS": DOMAIN, "DATABASE_URL": database_url}
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "backfill", "--list", "bounces", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while (saved := await committed(pool)) is None or saved["pages"] < 2:
            assert worker.returncode is None, "the backfill ended before it could be killed"
            assert asyncio.get_running_loop().time() < deadline, "the backfill never committed 2 pages"
            await asyncio.sleep(0.01)
    finally:
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
    assert worker.returncode == -signal.SIGKILL
    await wait_until_unlocked(pool)
    emulator.faults.clear()

    saved = await committed(pool)
    assert saved is not None
    pages = saved["pages"]
    assert 2 <= pages < 5
    assert saved == {"last_address": found[1000 * pages - 1], "pages": pages, "records": 1000 * pages}
    assert await committed_addresses(pool) == found[:1000 * pages]
    assert await rows(pool, BOUNCES) == {}  # nothing is applied before the list is read to its end
    cut = len(emulator.requests)

    result = await backfiller(store, make_client()).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (result.status, result.pulled, result.inserted) == ("ok", 5000, 5000)
    resumed_reads = gets(emulator, cut)
    assert resumed_reads[0] == {"page": "next", "address": saved["last_address"], "limit": "1000", "term": ""}
    # The committed pages were not read again: every read continues after the committed cursor.
    assert all(q.get("page") == "next" and q["address"] >= saved["last_address"] for q in resumed_reads)
    assert len(resumed_reads) == 5 - pages + 1
    assert await backfill_rows(pool) == 0
    resumed = await data_columns(pool)
    assert mirror_bounces(await rows(pool, BOUNCES)) == remote_bounces(emulator)
    resumed_changes = sorted(await changes(pool))

    # The same data backfilled without interruption into an empty mirror gives the same mirror.
    await pool.execute("TRUNCATE mailgun.bounces, mailgun.sync_runs, mailgun.changes")
    uninterrupted = await backfiller(store, make_client()).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert uninterrupted.counts() == result.counts()
    assert await data_columns(pool) == resumed
    assert sorted(await changes(pool)) == resumed_changes


async def test_a_failed_page_keeps_the_committed_pages_and_a_later_backfill_completes_from_there(
        pool, emulator, store, make_client, sleeps):
    found = seed_bounces(emulator, 550)
    await insert_row(pool, BOUNCES, DOMAIN, "gone@example.com", state="synced", synced_at=AN_HOUR_AGO)
    await insert_row(pool, BOUNCES, DOMAIN, "local.addition@example.net")
    mirror_before = await rows(pool, BOUNCES)
    # The first page and the next two come; the fourth never does.
    emulator.fail_next(503, times=None, page="next", skip=2)
    client = make_client(page_limit=100, retry=RetryPolicy(max_attempts=2, backoff_max=1.0, sleep=sleeps))

    failed = await backfiller(store, client).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert failed.status == "failed"
    assert "pull incomplete, nothing changed" in str(failed.error)
    assert await rows(pool, BOUNCES) == mirror_before
    assert await committed(pool) == {"last_address": found[299], "pages": 3, "records": 300}
    assert await committed_addresses(pool) == found[:300]

    emulator.faults.clear()
    cut = len(emulator.requests)
    completed = await backfiller(store, client).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (completed.status, completed.pulled, completed.inserted, completed.removed) == ("ok", 550, 550, 1)
    resumed_reads = gets(emulator, cut)
    assert resumed_reads[0]["address"] == found[299]
    assert len(resumed_reads) == 4  # records 301-550 in three pages, then the end of the list
    mirror = await rows(pool, BOUNCES)
    assert mirror["local.addition@example.net"]["sync_state"] == "pending"  # pull-only
    del mirror["local.addition@example.net"]
    assert mirror_bounces(mirror) == remote_bounces(emulator)
    assert await backfill_rows(pool) == 0


async def test_a_guarded_backfill_keeps_its_pages_and_applies_them_when_allowed(
        pool, emulator, store, make_client):
    seed_bounces(emulator, 150)
    await pool.executemany(
        "INSERT INTO mailgun.bounces (domain, address, sync_state, synced_at) VALUES ($1, $2, 'synced', $3)",
        [(DOMAIN, f"gone{i:03}@example.com", AN_HOUR_AGO) for i in range(40)])

    guarded = await backfiller(store, make_client(page_limit=100)).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (guarded.status, guarded.removed, guarded.inserted) == ("guarded", 0, 150)
    assert await committed(pool) is not None
    cut = len(emulator.requests)
    allowed = Backfiller(store, make_client(page_limit=100), ReconcileOptions(allow_mass_delete=True),
                         progress=Progress(io.StringIO()))

    result = await allowed.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (result.status, result.pulled, result.removed) == ("ok", 150, 40)
    assert len(gets(emulator, cut)) == 1  # only the read that confirms the list has ended
    assert mirror_bounces(await rows(pool, BOUNCES)) == remote_bounces(emulator)
    assert await backfill_rows(pool) == 0


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_a_backfill_stopped_by_sigterm_or_sigint_keeps_its_pages_says_so_and_exits_128_plus_the_signal(
        pool, emulator, database_url, sig, code):
    found = seed_bounces(emulator, 2500)
    emulator.inject(Fault(action="hold", method="GET", page="next", times=None))  # after the first page
    env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
           "MAILGUN_DOMAINS": DOMAIN, "DATABASE_URL": database_url}
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "backfill", "--list", "bounces", env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(30):
            await emulator.until_held()
            for _ in range(1000):  # the next page is asked while this one is saved
                if await committed(pool) is not None:
                    break
                await asyncio.sleep(0.01)
        worker.send_signal(sig)
        _, err = await asyncio.wait_for(worker.communicate(), 30)
    finally:
        emulator.release()

    assert worker.returncode == code, err.decode()
    logs = [json.loads(line) for line in err.decode().splitlines()]
    [reconciled] = [line for line in logs if line["event"] == "list_reconciled"]
    assert reconciled["status"] == "failed"
    assert (logs[-1]["event"], logs[-1]["signal"], logs[-1]["exit_code"]) == ("interrupted", sig.name, code)
    assert await committed(pool) == {"last_address": found[999], "pages": 1, "records": 1000}


# ---- progress ------------------------------------------------------------------------------------


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def test_progress_logs_records_pages_rate_and_elapsed_time_for_every_page(
        pool, emulator, store, make_client):
    seed_bounces(emulator, 250)
    out = io.StringIO()

    each_page = backfiller(store, make_client(page_limit=100), progress=Progress(out, every=0))

    with capture_logs() as logs:
        result = await each_page.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert result.status == "ok"
    lines = events(logs, "backfill_progress")
    assert [(line["records"], line["pages"]) for line in lines] == [(100, 1), (200, 2), (250, 3)]
    for line in lines:
        assert (line["domain"], line["list"], line["log_level"]) == (DOMAIN, "bounces", "info")
        assert isinstance(line["pages_per_s"], int | float) and line["pages_per_s"] >= 0
        assert isinstance(line["elapsed_s"], int | float) and line["elapsed_s"] >= 0
    assert [line["elapsed_s"] for line in lines] == sorted(line["elapsed_s"] for line in lines)
    assert out.getvalue() == ""  # not a terminal: log lines only, no bar


async def test_progress_logs_nothing_between_two_lines_closer_than_the_interval(
        pool, emulator, store, make_client):
    seed_bounces(emulator, 250)

    with capture_logs() as logs:
        result = await backfiller(store, make_client(page_limit=100), progress=Progress(
            io.StringIO(), every=3600)).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert result.status == "ok"
    assert events(logs, "backfill_progress") == []


async def test_progress_of_a_resumed_backfill_counts_from_the_committed_pages(
        pool, emulator, store, make_client, sleeps):
    seed_bounces(emulator, 250)
    emulator.fail_next(503, times=None, page="next", skip=1)
    client = make_client(page_limit=100, retry=RetryPolicy(max_attempts=1, sleep=sleeps))
    assert (await backfiller(store, client).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)).status == "failed"
    emulator.faults.clear()

    with capture_logs() as logs:
        result = await backfiller(store, client, progress=Progress(io.StringIO(), every=0)).reconcile(
            uuid.uuid4(), DOMAIN, BOUNCES)

    assert result.status == "ok"
    [resumed] = events(logs, "backfill_resumed")
    assert (resumed["after"], resumed["pages"], resumed["records"]) == ("bounced00199@example.com", 2, 200)
    assert [(line["records"], line["pages"]) for line in events(logs, "backfill_progress")] == [(250, 3)]


class Terminal:
    """A real pseudo-terminal: `file` is its terminal end, `drawn()` what was written to it."""

    def __init__(self) -> None:
        self._controller, terminal = os.openpty()
        self.file = os.fdopen(terminal, "w")
        os.set_blocking(self._controller, False)

    def drawn(self) -> str:
        self.file.flush()
        data = b""
        while True:
            try:
                chunk = os.read(self._controller, 65536)
            except BlockingIOError:
                return data.decode()
            data += chunk

    def close(self) -> None:
        self.file.close()
        os.close(self._controller)


@pytest.fixture
def terminal():
    opened = Terminal()
    yield opened
    opened.close()


async def test_progress_draws_a_bar_when_the_output_is_a_terminal(
        pool, emulator, store, make_client, terminal):
    seed_bounces(emulator, 2345)
    progress = Progress(terminal.file, every=3600)

    result = await backfiller(store, make_client(page_limit=1000), progress=progress).reconcile(
        uuid.uuid4(), DOMAIN, BOUNCES)

    assert result.status == "ok"
    drawn = terminal.drawn()
    for records, pages in (("1,000", 1), ("2,000", 2), ("2,345", 3)):
        assert f"\r\x1b[K{DOMAIN} bounces: {records} records, {pages} pages, " in drawn
    assert "pages/s" in drawn
    assert drawn.endswith("\r\n")  # the bar's line is ended once the list is read


def test_the_progress_bar_is_cut_to_the_terminals_width_keeping_its_counts_whole(terminal):
    # A line wider than the terminal wraps, and erasing it erases only its last row: each redraw
    # would leave a stale row behind.
    fcntl.ioctl(terminal.file.fileno(), termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    progress = Progress(terminal.file, every=3600)
    progress.start()
    ref = ListRef("mail.transactional-notifications.example.com", BOUNCES)
    for page in range(1, 6):
        progress.page(ref, page * 1000, page, 0)
    progress.done()

    frames = terminal.drawn().removesuffix("\r\n").split("\r\x1b[K")[1:]
    assert len(frames) == 5
    assert all(len(frame) < 80 for frame in frames), frames
    assert re.fullmatch(r"…[a-z.-]+\.example\.com bounces: 5,000 records, 5 pages, "
                        r"[\d.,]+ pages/s, \d+s", frames[-1]), frames[-1]


def test_the_progress_bar_is_drawn_whole_on_a_terminal_wide_enough(terminal):
    fcntl.ioctl(terminal.file.fileno(), termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    progress = Progress(terminal.file, every=3600)
    progress.page(ListRef("mail.transactional-notifications.example.com", BOUNCES), 1000, 1, 0)
    progress.done()
    assert terminal.drawn().startswith(
        "\r\x1b[Kmail.transactional-notifications.example.com bounces: 1,000 records, 1 pages, ")


# ---- one process per list ------------------------------------------------------------------------


async def test_a_reconcile_of_a_list_being_backfilled_is_skipped(
        pool, emulator, store, make_client, make_reconciler):
    seed_bounces(emulator, 300)
    emulator.seed(DOMAIN, COMPLAINTS, [{"address": "complained@example.com"}])
    emulator.inject(Fault(action="delay", delay_s=0.2, times=None, method="GET", list="bounces"))
    running = asyncio.create_task(
        backfiller(store, make_client(page_limit=100)).reconcile(uuid.uuid4(), DOMAIN, BOUNCES))
    deadline = asyncio.get_running_loop().time() + 10
    while not gets(emulator):
        assert asyncio.get_running_loop().time() < deadline, "the backfill never started reading"
        await asyncio.sleep(0.01)

    concurrent = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    other_list = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, COMPLAINTS)
    assert not running.done()
    backfilled = await running

    assert concurrent.status == "skipped"
    assert concurrent.counts() == (0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert other_list.status == "ok"  # the lock is the list's, not the domain's
    assert backfilled.status == "ok"
    # Every read of bounces was the backfill's: its four pages (and the last-page check), no second pull.
    assert len([r for r in emulator.requests if r.method == "GET" and r.path.endswith("/bounces")
                and r.query.get("page") != "last"]) == 4
    statuses = await pool.fetch("SELECT list, status FROM mailgun.sync_runs ORDER BY list")
    assert [tuple(r) for r in statuses] == [("bounces", "ok"), ("complaints", "ok")]


async def test_a_backfill_of_a_list_being_reconciled_is_skipped(
        pool, emulator, store, make_client, make_reconciler):
    seed_bounces(emulator, 300)
    emulator.inject(Fault(action="delay", delay_s=0.2, times=None, method="GET"))
    running = asyncio.create_task(
        make_reconciler(client=make_client(page_limit=100)).reconcile(uuid.uuid4(), DOMAIN, BOUNCES))
    deadline = asyncio.get_running_loop().time() + 10
    while not gets(emulator):
        assert asyncio.get_running_loop().time() < deadline, "the run never started reading"
        await asyncio.sleep(0.01)

    skipped = await backfiller(store, make_client(page_limit=100)).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    ran = await running

    assert (skipped.status, ran.status) == ("skipped", "ok")
    assert await committed(pool) is None
    assert len([r for r in emulator.requests if r.method == "GET" and r.path.endswith("/bounces")
                and r.query.get("page") != "last"]) == 4


async def _backfill_paused_after_its_first_page(pool, emulator, store, make_client, sleeps):
    """250 bounces on both sides, and a backfill that committed its first page (100) and failed;
    returns the addresses and the backfill, to resume."""
    found = seed_bounces(emulator, 250)
    await pool.executemany(
        "INSERT INTO mailgun.bounces (domain, address, code, error, created_at, sync_state, synced_at)"
        " VALUES ($1, $2, $3, $4, $5, 'synced', $6)",
        [(DOMAIN, r["address"], r["code"], r["error"], parse_timestamp(r["created_at"]),
          AN_HOUR_AGO - timedelta(hours=2)) for r in emulator.records(DOMAIN, BOUNCES)])
    emulator.fail_next(503, times=None, page="next")
    client = make_client(page_limit=100, retry=RetryPolicy(max_attempts=2, backoff_max=1.0, sleep=sleeps))
    backfill = backfiller(store, client)
    assert (await backfill.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)).status == "failed"
    emulator.faults.clear()
    return found, backfill


async def test_a_resumed_backfill_does_not_bring_back_what_was_deleted_since_its_pages_were_read(
        pool, emulator, store, make_client, make_reconciler, sleeps):
    found, backfill = await _backfill_paused_after_its_first_page(pool, emulator, store, make_client, sleeps)
    assert found[5] in await committed_addresses(pool)
    # Meanwhile the application deletes a record of that page, and a run carries it out.
    await pool.execute("DELETE FROM mailgun.bounces WHERE address = $1", found[5])
    assert (await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)).deleted == 1

    resumed = await backfill.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert (resumed.status, resumed.pulled, resumed.inserted) == ("ok", 249, 0)
    assert found[5] not in await rows(pool, BOUNCES)
    assert found[5] not in remote_bounces(emulator)


@pytest.mark.slow
async def test_a_resumed_backfill_does_not_bring_back_what_a_run_killed_before_recording_itself_removed(
        pool, emulator, store, make_client, database_url, sleeps):
    """The run's removal is its own evidence: a run SIGKILLed after removing a record Mailgun
    dropped, but before its sync_runs line, still makes the backfill read the list again."""
    found, backfill = await _backfill_paused_after_its_first_page(pool, emulator, store, make_client, sleeps)
    assert found[5] in await committed_addresses(pool)
    # Mailgun drops a record of the committed page; a run removes it from the mirror, then is
    # killed while it pushes the application's addition, before it records itself.
    emulator.remove(DOMAIN, BOUNCES, found[5])
    await insert_row(pool, BOUNCES, DOMAIN, "added@example.com")
    emulator.inject(Fault(action="delay", delay_s=30, method="POST"))
    await run_killed_once(emulator, database_url, lambda r: r.method == "POST" and r.status is None)
    emulator.faults.clear()
    await wait_until_unlocked(pool)
    assert found[5] not in await rows(pool, BOUNCES)
    assert not await pool.fetchval("SELECT count(*) FROM mailgun.sync_runs WHERE NOT dry_run"
                                   " AND (status = 'ok' OR removed > 0)")

    resumed = await backfill.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert resumed.status == "ok"
    assert found[5] not in await rows(pool, BOUNCES)


async def test_a_resumed_backfill_does_not_bring_back_what_a_run_removed_though_retention_pruned_its_record(
        pool, emulator, store, make_client, make_reconciler, sleeps):
    found, backfill = await _backfill_paused_after_its_first_page(pool, emulator, store, make_client, sleeps)
    # Mailgun drops a record of the saved page; a run removes it, then fails on its push.
    assert emulator.remove(DOMAIN, BOUNCES, found[5])
    await insert_row(pool, BOUNCES, DOMAIN, "added@example.com")
    emulator.inject(Fault(status=503, method="POST", times=None))
    removing = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert (removing.status, removing.removed) == ("failed", 1)
    emulator.faults.clear()
    # Two days on, a run that removed nothing fails, and a retention of one day prunes the first.
    await pool.execute("UPDATE mailgun.sync_runs SET started_at = started_at - interval '2 days',"
                       " finished_at = finished_at - interval '2 days'")
    await pool.execute("UPDATE mailgun.backfill_progress SET started_at = started_at - interval '2 days'")
    emulator.inject(Fault(status=503, method="GET", times=None))
    assert (await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)).status == "failed"
    emulator.faults.clear()
    await prune(pool, 1)
    assert not await pool.fetchval("SELECT count(*) FROM mailgun.sync_runs WHERE removed > 0")

    resumed = await backfill.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert resumed.status == "ok", resumed.error
    assert found[5] not in await rows(pool, BOUNCES)


@pytest.mark.slow
@pytest.mark.skipif(FAKETIME is None, reason="pip install libfaketime")
async def test_a_resumed_backfill_does_not_bring_back_what_a_run_whose_clock_is_behind_removed(
        pool, emulator, store, make_client, database_url, sleeps):
    # The run records itself by its own clock, which makes its run look older than the backfill.
    found, backfill = await _backfill_paused_after_its_first_page(pool, emulator, store, make_client, sleeps)
    assert emulator.remove(DOMAIN, BOUNCES, found[5])
    env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
           "MAILGUN_DOMAINS": DOMAIN, "DATABASE_URL": database_url,
           "LD_PRELOAD": str(FAKETIME), "FAKETIME": "-3600", "DONT_FAKE_MONOTONIC": "1"}
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", "--list", "bounces", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    assert await asyncio.wait_for(worker.wait(), 60) == 0
    assert found[5] not in await rows(pool, BOUNCES)

    resumed = await backfill.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert resumed.status == "ok", resumed.error
    assert found[5] not in await rows(pool, BOUNCES)


async def test_a_resumed_backfill_does_not_vouch_for_rows_added_after_it_began(
        pool, store, emulator, make_client, make_reconciler):
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"b{i:04}@example.com"} for i in range(300)])
    client = make_client(page_limit=100)
    emulator.fail_next(503, times=None, page="next", skip=1)
    backfill = Backfiller(store, client, ReconcileOptions(), progress=Progress(every=3600))
    assert (await backfill.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)).status == "failed"
    emulator.faults.clear()
    # Meanwhile Mailgun drops b0003, and the application adds it as its own suppression.
    emulator.remove(DOMAIN, BOUNCES, "b0003@example.com")
    await insert_row(pool, BOUNCES, DOMAIN, "b0003@example.com")

    resumed = await backfill.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert resumed.status == "ok"
    assert (await rows(pool, BOUNCES))["b0003@example.com"]["sync_state"] == "pending"
    later = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert later.pushed == 1
    assert "b0003@example.com" in {r["address"] for r in emulator.records(DOMAIN, BOUNCES)}


def _terminal_lines(raw: str) -> list[str]:
    """What a terminal shows, line by line, for output with carriage returns and erase-line
    sequences (colours taken out)."""
    raw = re.sub(r"\x1b\[[0-9;]*m", "", raw)
    shown: list[str] = []
    line, column = "", 0
    for token in re.findall(r"\x1b\[K|\r|\n|[^\r\n\x1b]+", raw):
        if token == "\r":
            column = 0
        elif token == "\n":
            shown.append(line)
            line, column = "", 0
        elif token == "\x1b[K":
            line = line[:column]
        else:
            line = line[:column] + token + line[column + len(token):]
            column += len(token)
    return [*shown, line]


@pytest.mark.slow
async def test_on_a_terminal_log_lines_never_share_the_progress_line_and_agree_with_it(
        pool, emulator, database_url):
    """A real backfill whose stdout and stderr are one terminal, long enough for a progress log
    line (every 5 s): the log line is a line of its own, and the bar drawn after it shows the same
    counts."""
    seed_bounces(emulator, 14_000)
    emulator.settings.latency_s = 0.45  # about 6 s for the 14 pages
    env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": str(emulator.base_url),
           "MAILGUN_DOMAINS": DOMAIN, "DATABASE_URL": database_url}
    controller, terminal = pty.openpty()
    try:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "backfill", "--list", "bounces", env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=terminal, stderr=terminal)
        os.close(terminal)
        raw = await asyncio.wait_for(asyncio.to_thread(_read_all, controller), 60)
        assert await asyncio.wait_for(worker.wait(), 30) == 0, raw
    finally:
        os.close(controller)

    lines = [line for line in _terminal_lines(raw.replace("\r\n", "\n")) if line.strip()]
    logged = [line for line in lines if "backfill_progress" in line]
    assert logged, raw
    bars = [line for line in lines if line.startswith(f"{DOMAIN} bounces: ")]
    assert bars
    for line in lines:  # a bar, a log line or the report: never two of them on one line
        assert not (f"{DOMAIN} bounces: " in line and "backfill_progress" in line), line
    for log_line in logged:
        pages = int(re.search(r"pages=(\d+)", log_line).group(1))
        assert log_line.startswith(str(datetime.now(UTC).year))
        # The raw stream right after the log line: the bar drawn again, with the same count.
        after = raw[raw.index(log_line.split()[0]):]
        assert re.search(rf"{DOMAIN} bounces: [\d,]+ records, (\d+) pages", after).group(1) == str(pages)


def _read_all(descriptor: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(descriptor, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()
