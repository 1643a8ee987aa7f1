"""The daemon's webhooks and probes: never behind the runs, answered in time whatever PostgreSQL
does (also after a failover lost the connection they wrote on, and at SIGTERM), and on a port of
their own with WEBHOOK_PORT. Each test runs `mailgun-sync daemon` as a
child process against the emulator and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from tests.support.account import API_KEY
from tests.support.daemon_process import DOMAINS, Running, daemon, first_runs_over, timed_get, until_ready
from tests.support.mirror import rows
from tests.support.proxy import SilentProxy
from tests.support.webhooks import deliver, event
from worker.daemon import CANCELLED_RUNS_WITHIN
from worker.database import POOL_SIZE
from worker.devtools.benchmark.run import _free_port
from worker.emulator import Fault, MailgunEmulator
from worker.records import SuppressionList
from worker.serving import REQUEST_HEAD_WITHIN
from worker.webhooks.endpoint import BODY_WITHIN
from worker.webhooks.writer import WRITE_WITHIN

# Each test runs `mailgun-sync daemon` as a child process.
pytestmark = pytest.mark.slow

BOUNCES = SuppressionList.BOUNCES
# Kubernetes' default probe timeout.
PROBE_TIMEOUT = 1.0


@pytest.fixture
async def emulator() -> AsyncIterator[MailgunEmulator]:
    async with MailgunEmulator(api_key=API_KEY, domains=list(DOMAINS)) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as opened:
        yield opened


async def runs_hold_every_connection(emulator: MailgunEmulator) -> None:
    """Every list's pull is parked at its first page: each run holds its connection, and the
    runs past the pool's size wait for one."""
    async with asyncio.timeout(30):
        await emulator.until_held(POOL_SIZE)
    await asyncio.sleep(0.5)
    assert len(emulator.held) == POOL_SIZE, "the other runs wait for a connection"


@pytest.fixture
async def busy(emulator, pool, database_url, session) -> AsyncIterator[Running]:
    """A daemon whose runs hold every connection of theirs, their pulls parked at Mailgun."""
    emulator.inject(Fault(action="hold", times=None, method="GET"))
    async with daemon(emulator, database_url, session) as running:
        await runs_hold_every_connection(emulator)
        yield running


# ---- never behind the runs ---------------------------------------------------------------------


async def test_a_webhook_is_stored_at_once_while_slow_runs_hold_every_connection_of_the_runs(
        busy, session, pool):
    started = time.monotonic()
    answer = await deliver(session, event("failed", "busy@example.com", DOMAINS[0]), url=busy.webhooks)
    elapsed = time.monotonic() - started

    assert answer == (200, "stored")
    assert elapsed < 1.0  # not when a run lets go of its connection
    assert "busy@example.com" in await rows(pool, BOUNCES)


async def test_readyz_answers_within_a_second_while_slow_runs_hold_every_connection_of_the_runs(
        busy, session):
    status, text, elapsed = await timed_get(session, f"{busy.http}/readyz")

    assert (status, text) == (200, "ready\n")
    assert elapsed < PROBE_TIMEOUT


async def test_runs_ending_while_the_schedule_is_slow_to_update_leave_readyz_and_webhooks_their_connections(
        busy, session, emulator, database_url, pool):
    await until_ready(session, busy)
    other = await asyncpg.connect(database_url)
    try:
        # Another session holds the schedule's rows (an operator's transaction, a server slow to
        # write): every run that ends waits to record its end, for up to 10 s.
        async with other.transaction():
            await other.execute("SELECT 1 FROM mailgun.schedule FOR UPDATE")
            emulator.faults.clear()
            emulator.release()  # the 10 runs end at once
            await asyncio.sleep(1.0)
            probes = [await timed_get(session, f"{busy.http}/readyz") for _ in range(2)]
            started = time.monotonic()
            answer = await deliver(session, event("failed", "ending@example.com", DOMAINS[0]),
                                   url=busy.webhooks)
            webhook_s = time.monotonic() - started
            waiting = await other.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()")
    finally:
        await other.close()

    assert waiting >= 1  # the runs' ends did wait on the schedule's rows meanwhile
    for status, text, elapsed in probes:
        assert (status, text) == (200, "ready\n")
        assert elapsed < PROBE_TIMEOUT
    assert answer == (200, "stored")
    assert webhook_s < 1.0
    assert "ending@example.com" in await rows(pool, BOUNCES)


# ---- a silent database ---------------------------------------------------------------------------


async def test_readyz_answers_503_within_a_second_when_postgresql_goes_silent_and_200_once_it_answers(
        emulator, pool, database_url, session):
    async with SilentProxy(database_url).running() as proxy, \
            daemon(emulator, proxy.url, session) as running:
        await until_ready(session, running)

        proxy.stall()
        try:
            # The first probe finds the pool's connection gone silent mid-query; the next ones
            # find no connection and cannot open one.
            for _ in range(3):
                status, text, elapsed = await timed_get(session, f"{running.http}/readyz")
                assert status == 503
                assert "did not answer" in text
                assert elapsed < PROBE_TIMEOUT
        finally:
            proxy.resume()
        status, _, elapsed = await timed_get(session, f"{running.http}/readyz")
        assert status == 200
        assert elapsed < PROBE_TIMEOUT


# ---- a connection lost for good (a failover) ----------------------------------------------------


async def written_once(session: aiohttp.ClientSession, running: Running, address: str) -> None:
    """A webhook stored through the pool's connection (the one the proxy will cut), and the
    tokens' first prune, which follows, over."""
    assert await deliver(session, event("complained", address, DOMAINS[0]), url=running.webhooks) \
        == (200, "stored")
    await asyncio.sleep(0.5)


async def test_a_ready_daemon_answers_webhooks_after_the_database_connection_it_wrote_on_was_lost(
        emulator, pool, database_url):
    # The old server never answers on the connections open at the cut, the new one takes
    # connections at once: /readyz soon says ready, so Mailgun's webhooks keep coming here.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
            SilentProxy(database_url).running() as proxy, \
            daemon(emulator, proxy.url, session) as running:
        await until_ready(session, running)
        await first_runs_over(pool)
        await written_once(session, running, "first@example.com")

        proxy.cut()
        lost = event("complained", "lost@example.com", DOMAINS[0])
        started = time.monotonic()
        pending = asyncio.ensure_future(deliver(session, lost, url=running.webhooks))
        await asyncio.sleep(0.5)
        await until_ready(session, running)
        after = await deliver(session, event("complained", "after@example.com", DOMAINS[0]),
                              url=running.webhooks)
        after_elapsed = time.monotonic() - started
        answer = await pending
        answered_in = time.monotonic() - started
        retried = await deliver(session, lost, url=running.webhooks)  # Mailgun's retry: same token

    assert answer[0] == 503  # nothing committed: Mailgun retries
    assert answered_in < WRITE_WITHIN + 1.0
    # Behind the abandoned batch, then on a connection of its own.
    assert after == (200, "stored")
    assert after_elapsed < 2 * WRITE_WITHIN + 1.0
    assert retried == (200, "stored")  # the token was not used up by the abandoned write
    assert sorted(await rows(pool, SuppressionList.COMPLAINTS)) == [
        "after@example.com", "first@example.com", "lost@example.com"]


async def test_sigterm_stops_the_daemon_within_its_grace_while_a_webhook_write_waits_on_a_lost_connection(
        emulator, pool, database_url):
    grace = 1.0  # below WRITE_WITHIN: the grace, not the write's own bound, stops the write
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
            SilentProxy(database_url).running() as proxy, \
            daemon(emulator, proxy.url, session, SHUTDOWN_GRACE=str(grace)) as running:
        await until_ready(session, running)
        await first_runs_over(pool)
        await written_once(session, running, "first@example.com")

        proxy.cut()
        pending = asyncio.ensure_future(
            deliver(session, event("complained", "lost@example.com", DOMAINS[0]), url=running.webhooks))
        await asyncio.sleep(0.3)
        running.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.wait_for(running.process.wait(), 30)
        elapsed = time.monotonic() - started
        answer = await pending

    assert code == 0
    assert elapsed < grace + 2.5  # and closing the pools: a second at most
    assert answer[0] == 503  # not stored, and answered before the process went
    assert sorted(await rows(pool, SuppressionList.COMPLAINTS)) == ["first@example.com"]


async def test_sigterm_stops_the_daemon_while_a_run_waits_on_a_connection_lost_for_good(
        emulator, pool, database_url):
    # A pull read slowly, a page a second, so the first runs are under way when the connections go.
    for domain in DOMAINS:
        emulator.seed(domain, BOUNCES, [{"address": f"b{i:03}@example.com"} for i in range(600)])
    emulator.inject(Fault(action="delay", delay_s=1.0, times=None, method="GET", list="bounces"))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
            SilentProxy(database_url).running() as proxy, \
            daemon(emulator, proxy.url, session, SHUTDOWN_GRACE="1") as running:
        await until_ready(session, running)
        for _ in range(300):
            if any("/bounces" in r.path for r in emulator.requests):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # a page or two staged: the run is between its statements
        proxy.cut()
        await asyncio.sleep(1.5)
        running.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.wait_for(running.process.wait(), 30)
        elapsed = time.monotonic() - started

    assert code == 0
    # The grace, then the cancelled runs' own bound, then closing the pools.
    assert elapsed < 1 + CANCELLED_RUNS_WITHIN + 4


# ---- WEBHOOK_PORT --------------------------------------------------------------------------------


async def test_with_webhook_port_webhooks_are_served_there_only_and_probes_and_metrics_on_http_port_only(
        emulator, pool, database_url, session):
    async with daemon(emulator, database_url, session, WEBHOOK_PORT=str(_free_port())) as running:
        assert running.webhooks != running.http
        delivery = event("complained", "ported@example.com", DOMAINS[1])
        for path in ("/webhooks/mailgun", f"/webhooks/mailgun/{DOMAINS[1]}"):
            assert (await deliver(session, delivery, path=path, url=running.http))[0] == 404
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await timed_get(session, f"{running.webhooks}{path}"))[0] == 404

        await until_ready(session, running)  # webhooks are answered 503 until its domains are planned
        assert await deliver(session, delivery, url=running.webhooks) == (200, "stored")
        assert "ported@example.com" in await rows(pool, SuppressionList.COMPLAINTS)
        status, metrics, _ = await timed_get(session, f"{running.http}/metrics")
        assert status == 200
        assert 'mailgun_sync_webhooks_total{event="complained",outcome="stored"} 1.0' in metrics


# ---- the webhooks' port, open to the internet ---------------------------------------------------

UNSIGNED = b"POST /webhooks/mailgun HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
CORRUPT_GZIP = UNSIGNED + b"Content-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello"
CORRUPT_DEFLATE = UNSIGNED + b"Content-Encoding: deflate\r\nContent-Length: 5\r\n\r\nhello"
CUT_SHORT = UNSIGNED + b"Content-Length: 100\r\n\r\n{\"a\":"
BROKEN_CHUNK = UNSIGNED + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n"


def sent(port: int, data: bytes, *, then: str = "wait") -> bytes:
    """`data` on a connection of its own; then the status line answered (`wait`), or nothing:
    the client's end shut for writing (`shut`) or closed (`hang_up`) before the body's end."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(data)
        if then == "hang_up":
            time.sleep(0.01)
            return b""
        if then == "shut":
            connection.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while b"\r\n" not in answer and (chunk := connection.recv(4096)):
                answer += chunk
        return answer.split(b"\r\n")[0]


def log_lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.startswith(b"{")]


async def test_bodies_that_cannot_be_read_are_refused_400_counted_and_logged_once_a_second_without_tracebacks(
        emulator, pool, database_url, session, tmp_path):
    stderr = tmp_path / "daemon.err"
    async with daemon(emulator, database_url, session, stderr=stderr,
                      WEBHOOK_PORT=str(_free_port())) as running:
        await until_ready(session, running)
        port = int(running.webhooks.rsplit(":", 1)[1])
        started = time.monotonic()
        answers = {kind: [await asyncio.to_thread(sent, port, data, then=then) for _ in range(100)]
                   for kind, data, then in [("corrupt gzip", CORRUPT_GZIP, "wait"),
                                            ("corrupt deflate", CORRUPT_DEFLATE, "wait"),
                                            ("broken chunk", BROKEN_CHUNK, "wait"),
                                            ("cut short", CUT_SHORT, "shut"),
                                            ("hung up", CUT_SHORT, "hang_up")]}
        flood_s = time.monotonic() - started
        await asyncio.sleep(0.5)
        _, metrics, _ = await timed_get(session, f"{running.http}/metrics")
        ready = await timed_get(session, f"{running.http}/readyz")
    logged = log_lines(stderr)

    for kind in ("corrupt gzip", "corrupt deflate", "broken chunk"):
        assert {answer.split(b" ")[1] for answer in answers[kind]} == {b"400"}, kind
    # Each counted, before any database work; the broken chunk is refused by the HTTP server
    # itself, before the endpoint: it is no webhook. A body cut short is answered to nobody.
    assert 'mailgun_sync_webhooks_unverified_total{reason="unreadable"} 400.0' in metrics
    assert 'mailgun_sync_webhook_duration_seconds_count{status="400"} 400.0' in metrics
    assert 'status="500"' not in metrics
    # No traceback, nothing at error, and each kind of refusal at most once a second.
    assert not [line for line in logged if line["level"] in ("error", "critical") or "exception" in line]
    refusals = [line for line in logged if line["event"] in ("webhook_refused", "http_request_refused")]
    assert {line["event"] for line in refusals} == {"webhook_refused", "http_request_refused"}
    assert len(refusals) <= 2 * (flood_s + 1)
    assert ready[0] == 200


HALF_A_HEAD = b"POST /webhooks/mailgun HTTP/1.1\r\nHost: x\r\n"


def closed_after(port: int, data: bytes, within: float) -> tuple[float, bytes]:
    """`data` on a connection of its own, then nothing: how long until the daemon closed it, and
    what it answered meanwhile (inf: still open after `within` seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=within) as connection:
        started = time.monotonic()
        connection.sendall(data)
        answer = b""
        try:
            while chunk := connection.recv(4096):
                answer += chunk
        except TimeoutError:
            return float("inf"), answer
        except ConnectionResetError:
            pass
        return time.monotonic() - started, answer


async def test_a_connection_that_sends_half_a_request_or_nothing_is_closed_within_its_bound(
        emulator, pool, database_url, session):
    async with daemon(emulator, database_url, session, WEBHOOK_PORT=str(_free_port())) as running:
        await until_ready(session, running)
        http, webhooks = (int(url.rsplit(":", 1)[1]) for url in (running.http, running.webhooks))
        cases = {"nothing sent": (webhooks, b""),
                 "half a head": (webhooks, HALF_A_HEAD),
                 "half a head on HTTP_PORT": (http, b"GET /readyz HTTP/1.1\r\nHost: x\r\n"),
                 "idle after an answer": (http, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
                 "half a body": (webhooks, CUT_SHORT)}
        waited = [asyncio.to_thread(closed_after, port, data, REQUEST_HEAD_WITHIN + 10)
                  for port, data in cases.values()]
        outcomes = dict(zip(cases, await asyncio.gather(*waited), strict=True))

    for case in ("nothing sent", "half a head", "half a head on HTTP_PORT", "idle after an answer"):
        elapsed, _ = outcomes[case]
        assert REQUEST_HEAD_WITHIN - 1 < elapsed < REQUEST_HEAD_WITHIN + 2, (case, elapsed)
    assert outcomes["idle after an answer"][1].startswith(b"HTTP/1.1 200 OK")
    elapsed, answer = outcomes["half a body"]
    assert BODY_WITHIN - 1 < elapsed < BODY_WITHIN + 2
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
    assert answer.endswith(f"the body was not sent within {BODY_WITHIN:g} s\n".encode())


async def test_the_probes_and_webhooks_answer_with_more_half_sent_requests_open_than_the_soft_limit_of_files(
        emulator, pool, database_url, session, tmp_path):
    stderr = tmp_path / "daemon.err"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    held: list[socket.socket] = []
    async with daemon(emulator, database_url, session, stderr=stderr, open_files=256,
                      WEBHOOK_PORT=str(_free_port())) as running:
        await until_ready(session, running)
        port = int(running.webhooks.rsplit(":", 1)[1])
        try:
            for _ in range(1_000):  # about 4 times the limit it was started with
                connection = socket.create_connection(("127.0.0.1", port), timeout=2)
                connection.sendall(HALF_A_HEAD)
                held.append(connection)
            await asyncio.sleep(0.5)
            probes = [await timed_get(session, f"{running.http}{path}") for path in ("/healthz", "/readyz")]
            started = time.monotonic()
            answer = await deliver(session, event("failed", "crowded@example.com", DOMAINS[0]),
                                   url=running.webhooks)
            webhook_s = time.monotonic() - started
        finally:
            for connection in held:
                connection.close()
    started_line = next(line for line in log_lines(stderr) if line["event"] == "daemon_started")

    assert started_line["open_files_limit"] == hard  # raised from 256 to the hard limit
    assert [(status, text) for status, text, _ in probes] == [(200, "ok\n"), (200, "ready\n")]
    assert all(elapsed < PROBE_TIMEOUT for *_, elapsed in probes)
    assert answer == (200, "stored")
    assert webhook_s < 1.0
