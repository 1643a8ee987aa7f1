"""What the system refuses at start (a port in use, a host name that does not resolve, a directory
that cannot be made, an output that cannot be written) is one line naming the port, host or path
and the setting or flag, with exit code 1: never a traceback. Each test runs the real command in a
child process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.account import API_KEY, DOMAIN
from tests.support.cli import Outcome
from tests.support.process import run_worker
from tests.support.waiting import wait_for

# Each test runs `mailgun-sync` as a child process.
pytestmark = pytest.mark.slow

# Not even attempted by a resolver: the name is reserved as one that never resolves (RFC 6761).
UNRESOLVABLE = "mailgun-sync-test.invalid"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process's socket listens on (this test's)."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # nosec B104: every IPv4 interface, as the daemon binds
        taken.listen()
        yield taken.getsockname()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def daemon_env(database_url: str) -> dict[str, str]:
    return {**os.environ, "MAILGUN_API_KEY": API_KEY, "MAILGUN_API_BASE": "http://127.0.0.1:9",
            "MAILGUN_DOMAINS": DOMAIN, "DATABASE_URL": database_url, "SYNC_JITTER": "0"}


def one_line(outcome: Outcome) -> str:
    assert outcome.code == 1, outcome.err
    assert "Traceback" not in outcome.err
    [line] = outcome.err.splitlines()
    return line


async def test_a_daemon_whose_http_port_is_in_use_says_so_in_one_line(daemon_env, busy_port):
    outcome = await run_worker("daemon", env={**daemon_env, "HTTP_PORT": str(busy_port)})
    assert one_line(outcome) == (
        f"mailgun-sync: HTTP_PORT (--http-port): cannot listen on port {busy_port}: "
        "it is already in use by another process; stop that one or give another port")


async def test_a_daemon_whose_webhook_port_is_in_use_names_webhook_port(daemon_env, busy_port):
    outcome = await run_worker("daemon", "--http-port", str(free_port()),
                               env={**daemon_env, "WEBHOOK_PORT": str(busy_port)})
    line = one_line(outcome)
    assert line.startswith(
        f"mailgun-sync: WEBHOOK_PORT (--webhook-port): cannot listen on port {busy_port}: ")
    assert "already in use" in line


async def test_an_emulator_whose_port_is_in_use_names_the_flag_and_the_port(busy_port):
    outcome = await run_worker("emulator", "--port", str(busy_port))
    line = one_line(outcome)
    assert line.startswith(f"mailgun-sync: --port: cannot listen on 127.0.0.1:{busy_port}: ")
    assert "already in use" in line


async def test_an_emulator_host_that_does_not_resolve_names_the_flag_and_the_host():
    outcome = await run_worker("emulator", "--host", UNRESOLVABLE, "--port", str(free_port()))
    line = one_line(outcome)
    assert line.startswith(f"mailgun-sync: --host: cannot listen on {UNRESOLVABLE}:")
    assert f"the host name {UNRESOLVABLE} does not resolve" in line


async def test_an_emulator_port_out_of_range_is_a_usage_error():
    outcome = await run_worker("emulator", "--port", "99999")
    assert outcome.code == 2
    [line] = outcome.err.splitlines()
    assert "--port" in line and "is not a port number from 0 to 65535" in line


async def test_a_demo_directory_that_cannot_be_made_names_the_flag_and_the_path(tmp_path: Path):
    (tmp_path / "a-file").write_text("not a directory\n")
    where = tmp_path / "a-file" / "database"
    outcome = await run_worker("demo", "--keep", str(where))
    assert one_line(outcome) == f"mailgun-sync: --keep: cannot keep the database in {where}: Not a directory"


FULL = Path("/dev/full")  # every write to it fails: no space left on device


async def test_a_database_host_that_does_not_resolve_names_database_url_and_shows_no_part_of_it():
    outcome = await run_worker("status", env={
        **os.environ, "DATABASE_URL": f"postgresql://mirror:S3cretKey9@db.{UNRESOLVABLE}:5432/app"})
    line = one_line(outcome)
    # The resolver's own reason follows ("Name or service not known" from glibc).
    assert line.startswith("mailgun-sync: PostgreSQL could not be reached while connecting: "
                           "DATABASE_URL's host name does not resolve ("), line
    assert UNRESOLVABLE not in line and "S3c" not in line


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler of its own for SIGTERM (Python installs none by itself)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:  # it has already exited
        return True
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="no /proc to see a process's handlers")
@pytest.mark.parametrize("command", ["python -m worker", "mailgun-sync"])
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_a_daemon_stopped_while_its_modules_load_exits_at_once_quietly_with_the_shells_code(
        daemon_env, command, sig, code):
    argv = [sys.executable, "-m", "worker"] if command == "python -m worker" else \
        [str(Path(sys.executable).with_name("mailgun-sync"))]
    process = await asyncio.create_subprocess_exec(
        *argv, "daemon", env={**daemon_env, "HTTP_PORT": "0"}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    # The moment the worker's first module sets its handlers: the rest (about half a second of
    # imports) is still to load.
    await wait_for(lambda: catches_sigterm(process.pid), seconds=10)
    process.send_signal(sig)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert (process.returncode, out, err) == (code, b"", b"")


@pytest.mark.skipif(not FULL.exists(), reason="no /dev/full on this system")
async def test_an_output_that_cannot_be_written_is_one_line(database_url):
    with FULL.open("w") as full:  # noqa: ASYNC230 (opening a device does not block)
        outcome = await run_worker("status", env={**os.environ, "DATABASE_URL": database_url},
                                   stdout=full)
    line = one_line(outcome)
    assert line.startswith("mailgun-sync: ") and "No space left on device" in line
