"""PostgreSQL going away or refusing writes: a clear error, nothing half-applied, and the next run
converges. (A server restart looks the same to the worker as its connections being terminated,
which is what these tests do; the server itself is shared by the whole test run.)"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import uuid

import asyncpg
import orjson
import pytest

from tests.support.account import DOMAIN
from tests.support.mirror import rows
from tests.support.proxy import SilentProxy
from worker.database import CopyWatch, open_pool
from worker.devtools.sql import queries
from worker.emulator import Fault
from worker.migrate import migrate
from worker.reconcile import ReconcileOptions, Reconciler
from worker.records import SuppressionList
from worker.store import MirrorStore

BOUNCES = SuppressionList.BOUNCES
N, PENDING = 300, 20

# Only this test's database: other databases on the server (another test run) are left alone.
LOCK_HOLDERS = ("SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND l.pid <> pg_backend_pid() "
                "AND d.datname = current_database()")


async def arrange(pool, emulator) -> None:
    emulator.generate(DOMAIN, BOUNCES, N)
    await pool.execute(queries()["bench_prepare_mirror"], DOMAIN, N, PENDING)


async def terminate_lock_holders(pool) -> int:
    pids = [r["pid"] for r in await pool.fetch(LOCK_HOLDERS)]
    for pid in pids:
        await pool.execute("SELECT pg_terminate_backend($1)", pid)
    return len(pids)


async def converges(pool, emulator, make_reconciler) -> None:
    result = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert result.status == "ok", result.error
    mirror = await rows(pool, BOUNCES)
    assert set(mirror) == {r["address"] for r in emulator.records(DOMAIN, BOUNCES)}
    assert {r["sync_state"] for r in mirror.values()} == {"synced"}
    assert len(mirror) == N + PENDING


async def kill_during(pool, emulator, make_reconciler, method: str) -> None:
    emulator.inject(Fault(action="delay", delay_s=0.5, times=1, method=method))
    running = asyncio.create_task(make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES))
    deadline = asyncio.get_running_loop().time() + 10
    while not [r for r in emulator.requests if r.method == method]:
        assert asyncio.get_running_loop().time() < deadline, f"no {method} reached Mailgun"
        await asyncio.sleep(0.01)
    assert await terminate_lock_holders(pool) == 1
    result = await running
    assert result.status == "failed"
    assert "PostgreSQL" in str(result.error)


async def test_connection_killed_mid_pull_changes_nothing_then_converges(pool, emulator, make_reconciler):
    await arrange(pool, emulator)
    before = await rows(pool, BOUNCES)
    await kill_during(pool, emulator, make_reconciler, "GET")
    assert await rows(pool, BOUNCES) == before
    await converges(pool, emulator, make_reconciler)


async def test_connection_killed_mid_push_keeps_rows_pending_then_converges(pool, emulator, make_reconciler):
    await arrange(pool, emulator)
    await kill_during(pool, emulator, make_reconciler, "POST")
    pending = [a for a, r in (await rows(pool, BOUNCES)).items() if r["sync_state"] == "pending"]
    assert len(pending) == PENDING  # Mailgun may have them, but nothing confirmed them here
    await converges(pool, emulator, make_reconciler)


async def test_a_lock_left_by_a_dead_process_is_released(pool, database_url, emulator, make_reconciler):
    await arrange(pool, emulator)
    holder = await asyncpg.connect(database_url)
    assert await holder.fetchval(queries()["try_lock_list"], DOMAIN, "bounces")
    skipped = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
    assert skipped.status == "skipped"
    await pool.execute("SELECT pg_terminate_backend($1)", holder.get_server_pid())
    await holder.close()
    await converges(pool, emulator, make_reconciler)


async def test_a_read_only_database_is_a_clear_error_and_changes_nothing(
        empty_database_url, emulator, client):
    async with open_pool(empty_database_url) as setup:
        await migrate(setup)
        await arrange(setup, emulator)
        before = await rows(setup, BOUNCES)
        name = await setup.fetchval("SELECT current_database()")
        await setup.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    async with open_pool(empty_database_url) as pool:
        result = await Reconciler(MirrorStore(pool), client, ReconcileOptions()).reconcile(
            uuid.uuid4(), DOMAIN, BOUNCES)
        assert result.status == "failed"
        assert "read-only transaction" in str(result.error)
        assert str(result.error).startswith("PostgreSQL failed while")
        assert await rows(pool, BOUNCES) == before
        assert not [r for r in emulator.requests if r.method == "POST"]


def _own_network_namespaces() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


async def _over_a_socket_file(pool) -> str:
    """The test database's URL by the server's Unix socket, which a network namespace leaves
    reachable."""
    directory = (await pool.fetchval("SHOW unix_socket_directories")).split(",")[0].strip()
    port, name, user = await pool.fetchrow("SELECT current_setting('port'), current_database(), current_user")
    return f"postgresql://{user}@/{name}?host={directory}&port={port}"


async def _statement_on_a_lost_server(pool, dead_after: float, give_up: float) -> dict:
    child = await asyncio.create_subprocess_exec(
        "unshare", "-n", sys.executable, "-m", "tests.support.lost_network",
        await _over_a_socket_file(pool), str(dead_after), str(give_up),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(child.communicate(), give_up + 30)
    return orjson.loads(out)


needs_network_namespaces = pytest.mark.skipif(
    not _own_network_namespaces(), reason="needs `unshare -n` (root) and `ip`")


@pytest.mark.slow
@needs_network_namespaces
async def test_a_statement_whose_server_is_lost_without_a_word_fails_within_dead_after(pool):
    # A run waits for its statement's answer on its one connection; a server gone without closing
    # it (a failover, a powered-off host) never answers, and without the kernel's probes the run,
    # and the list with it, would wait until a restart.
    outcome = await _statement_on_a_lost_server(pool, dead_after=3, give_up=20)
    assert outcome["outcome"] == "failed"
    assert outcome["seconds"] <= 4
    assert outcome["error"].startswith("PostgreSQL failed while waiting for a long statement")


@pytest.mark.slow
@needs_network_namespaces
async def test_the_lost_server_above_is_silent_indeed_for_an_unprobed_connection(pool):
    # The control: the same loss, with probes too late to matter, is a statement still waiting.
    outcome = await _statement_on_a_lost_server(pool, dead_after=600, give_up=5)
    assert outcome["outcome"] == "still waiting"


async def test_the_server_gives_up_a_silent_worker_as_soon_as_the_worker_gives_it_up(database_url):
    # Its end of a lost connection holds the list's advisory lock; left to the server's defaults
    # (two hours), the list would stay locked for the next run long after the worker moved on.
    async with open_pool(database_url, max_size=1, dead_after=60) as pool:
        settings = await pool.fetchrow(
            "SELECT current_setting('tcp_keepalives_idle') AS idle, "
            "current_setting('tcp_keepalives_interval') AS interval, "
            "current_setting('tcp_keepalives_count') AS probes, "
            "current_setting('tcp_user_timeout') AS user_timeout, "
            "inet_client_addr() IS NULL AS over_a_socket_file")
    if settings["over_a_socket_file"]:
        pytest.skip("a Unix socket has no TCP settings")
    assert dict(settings) == {"idle": "20", "interval": "10", "probes": "4",
                              "user_timeout": "60000", "over_a_socket_file": False}


@pytest.mark.parametrize("answer_within", [pytest.param(2.0, id="DATABASE_TIMEOUT"),
                                           pytest.param(None, id="no bound", marks=pytest.mark.slow)])
async def test_a_run_whose_server_goes_silent_behind_a_proxy_fails_within_database_timeout(
        answer_within, database_url, pool, emulator, client):
    # A proxy between the worker and the server (a service mesh's sidecar, a pooler) answers the
    # kernel's probes for a server it has lost, so only a bound on each answer notices. The run
    # fails within it, saying so, its connection closed rather than waiting for a cancellation
    # that nothing answers; once the lost session is gone (a failover ends it) the next run
    # through the same pool converges. Without the bound the run is still waiting.
    await arrange(pool, emulator)
    loop = asyncio.get_running_loop()
    async with SilentProxy(database_url).running() as proxy, \
            open_pool(proxy.url, max_size=2, answer_within=answer_within) as proxied:
        reconciler = Reconciler(MirrorStore(proxied, answer_within=answer_within), client, ReconcileOptions())
        emulator.inject(Fault(action="delay", delay_s=0.5, times=1, method="GET"))
        running = asyncio.create_task(reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES))
        while not [r for r in emulator.requests if r.method == "GET"]:
            assert not running.done(), running.result()
            await asyncio.sleep(0.01)
        proxy.cut()  # the connections open now carry nothing more; new ones work
        lost = loop.time()
        done, _ = await asyncio.wait([running], timeout=answer_within + 3 if answer_within else 5)
        if answer_within is None:
            assert not done, "the run was expected to wait for the silent server"
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            return
        result = running.result()
        assert result.status == "failed"
        assert loop.time() - lost <= answer_within + 2
        assert "PostgreSQL did not answer in time while" in str(result.error)
        assert await terminate_lock_holders(pool) == 1  # the failover ends the lost session
        while await pool.fetchval(f"SELECT count(*) FROM ({LOCK_HOLDERS}) held"):
            assert loop.time() - lost < 30, "the lost session's lock was never released"
            await asyncio.sleep(0.01)

        again = await reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert again.status == "ok", again.error
    assert len(await rows(pool, BOUNCES)) == N + PENDING


@pytest.mark.slow
@pytest.mark.parametrize("store_told", [True, False], ids=["store told", "store not told"])
async def test_a_pull_longer_than_database_timeout_is_not_given_up_while_postgresql_answers(
        store_told, pool, database_url, emulator, make_client):
    # The pull is streamed into one COPY; Mailgun's time (a large list, a rate limit's waits) is
    # no answer of PostgreSQL's, whether or not the store knows the pool's DATABASE_TIMEOUT.
    emulator.seed(DOMAIN, BOUNCES, [{"address": f"a{i:04}@example.com"} for i in range(500)])
    emulator.inject(Fault(action="delay", delay_s=0.6, times=None, method="GET"))
    async with open_pool(database_url, max_size=2, answer_within=1.0) as bounded:
        store = MirrorStore(bounded, answer_within=1.0) if store_told else MirrorStore(bounded)
        result = await Reconciler(store, make_client(page_limit=100), ReconcileOptions()).reconcile(
            uuid.uuid4(), DOMAIN, BOUNCES)
    assert (result.status, result.error, result.inserted) == ("ok", None, 500)


@pytest.mark.slow
async def test_a_server_silent_while_a_pull_streams_into_it_fails_the_run_within_database_timeout(
        pool, database_url, emulator, make_client):
    # Enough records that the COPY sends while Mailgun's pages are still coming, and fills the
    # buffers on the way: the server then stops taking them (flow control, which a closed
    # connection does not lift). The run fails DATABASE_TIMEOUT after Mailgun's last answer.
    emulator.generate(DOMAIN, BOUNCES, 150000)
    emulator.inject(Fault(action="delay", delay_s=0.2, times=None, method="GET"))
    loop = asyncio.get_running_loop()
    last_answer = loop.time()

    async def note_answers() -> None:
        nonlocal last_answer
        answered = 0
        while True:
            now = sum(1 for r in list(emulator.requests) if r.status is not None)
            if now != answered:
                answered, last_answer = now, loop.time()
            await asyncio.sleep(0.01)

    async with SilentProxy(database_url).running() as proxy, \
            open_pool(proxy.url, max_size=2, answer_within=2.0) as proxied:
        reconciler = Reconciler(MirrorStore(proxied, answer_within=2.0), make_client(), ReconcileOptions())
        noting = asyncio.create_task(note_answers())
        running = asyncio.create_task(reconciler.reconcile(uuid.uuid4(), DOMAIN, BOUNCES))
        while len([r for r in emulator.requests if r.method == "GET"]) < 3:
            assert not running.done(), running.result()
            await asyncio.sleep(0.01)
        proxy.cut()
        result = await asyncio.wait_for(running, 60)
        noting.cancel()
    assert result.status == "failed"
    assert "PostgreSQL did not answer in time while staging" in str(result.error)
    assert loop.time() - last_answer <= 2.0 + 1.5


async def test_a_run_stopped_as_its_pull_copy_ends_is_stopped(pool):
    # The stop (SIGTERM, a drain past its grace) lands while the COPY's watch is put away.
    async with pool.acquire() as connection:
        copied = asyncio.Event()
        went_on = []

        async def copying() -> None:
            async with CopyWatch(connection, 10.0, "staging"):
                await copied.wait()
            went_on.append(True)

        task = asyncio.create_task(copying())
        await asyncio.sleep(0.05)
        copied.set()
        await asyncio.sleep(0)  # the COPY is over: the watch is being put away
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert task.cancelled()
    assert went_on == []

