"""The image, built from the Dockerfile and run by a real Docker engine as the manifests run it: its
own user, a read-only root filesystem (and no writable path at all), no capabilities, the secrets
as read-only files. `migrate`
creates the schema, `run` mirrors the lists of the emulator the image carries, the daemon becomes
ready and healthy, and SIGTERM stops it with exit code 0 within the grace Kubernetes gives it.

Where no Docker engine answers, every test here is skipped, saying so. Containers use the host's
network (the engine may have no bridge), so they reach the tests' PostgreSQL on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
import yaml

from tests.support.account import API_KEY, DOMAIN
from worker.settings import ENVIRONMENT

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "mailgun-sync:smoke-test"
USER = "10001:10001"  # the manifests' runAsUser and runAsGroup
SECRETS_DIR = "/run/secrets/mailgun-sync"  # where the manifests mount the Secret
BOUNCES = 120  # records the emulator serves: more than one page
READY_DEADLINE_S = 30.0
STANDIN = "../shared/tools/docker-standin.sh"
ADDED_BYTES_BUDGET = 40_000_000  # about 33 MB now: the virtual environment alone
RUN_LEFT_S = 2.0  # how long the run in progress still takes after SIGTERM

# Docker's command starts for every step; a build on a machine with an empty cache installs every
# dependency in the container.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class Done:
    code: int
    out: str
    err: str


async def docker(*args: str, seconds: float = 120.0) -> Done:
    docker_command = shutil.which("docker")
    assert docker_command is not None
    process = await asyncio.create_subprocess_exec(
        docker_command, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    try:
        out, err = await asyncio.wait_for(process.communicate(), seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"docker {' '.join(args[:2])} took over {seconds} s") from None
    assert process.returncode is not None
    return Done(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def engine_answers() -> str | None:
    """Why the image cannot be tested here, or None when a Docker engine answers."""
    if shutil.which("docker") is None:
        return "no `docker` command on PATH"
    done = asyncio.run(docker("info", "--format", "{{.ServerVersion}}", seconds=30))
    if done.code != 0:
        hint = f" (start one with {STANDIN})" if (ROOT / STANDIN).is_file() else ""
        return f"no Docker engine answers{hint}: {done.err.strip()[-200:]}"
    return None


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    reason = engine_answers()
    if reason is not None:
        pytest.skip(f"the image is neither built nor run: {reason}")
    # Host network for the build too: pip inside it reaches the package index as the host does.
    done = asyncio.run(docker("build", "--network", "host", "--tag", IMAGE, str(ROOT), seconds=840))
    assert done.code == 0, (done.out + done.err)[-4000:]
    yield IMAGE


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def database_mounts(url: str) -> list[str]:
    """An embedded PostgreSQL is reached on a Unix socket, in a directory only its server's user may
    enter: the socket alone is mounted, at its path."""
    parts = urlsplit(url)
    if parts.hostname:
        return []
    [socket_dir] = parse_qs(parts.query)["host"]
    socket_path = f"{socket_dir}/.s.PGSQL.{parts.port or 5432}"
    return ["--volume", f"{socket_path}:{socket_path}"]


def deployed() -> tuple[dict[str, str], int]:
    """The ConfigMap's settings and the Deployment's termination grace period, as shipped."""
    configmap = yaml.safe_load((ROOT / "deploy/k8s/base/configmap.yaml").read_text())
    deployment = yaml.safe_load((ROOT / "deploy/k8s/base/deployment.yaml").read_text())
    return configmap["data"], deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


class Containers:
    """`docker run` as the manifests run the worker; every container started is removed after."""

    def __init__(self, image: str, secrets_dir: Path, database_url: str) -> None:
        self.image = image
        self.secrets_dir = secrets_dir
        self.database_url = database_url
        self.names: list[str] = []

    def secret(self, name: str, value: str) -> None:
        path = self.secrets_dir / name
        path.write_text(value)
        path.chmod(0o444)

    def hardened(self, name: str) -> list[str]:
        self.names.append(name)
        # No writable path at all: not even the /tmp the manifests mount.
        return ["--name", name, "--network", "host", "--read-only", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges", "--volume", f"{self.secrets_dir}:{SECRETS_DIR}:ro",
                *database_mounts(self.database_url)]

    def settings(self, **extra: str) -> list[str]:
        env = {"DATABASE_URL_FILE": f"{SECRETS_DIR}/DATABASE_URL",
               "MAILGUN_API_KEY_FILE": f"{SECRETS_DIR}/MAILGUN_API_KEY", **extra}
        assert set(env) <= set(ENVIRONMENT), "settings the worker reads"
        return [arg for name, value in env.items() for arg in ("--env", f"{name}={value}")]

    async def run(self, *argv: str, **settings: str) -> Done:
        name = f"mailgun-sync-smoke-{secrets.token_hex(4)}"
        return await docker("run", "--rm", *self.hardened(name), *self.settings(**settings), self.image,
                            *argv)

    async def start(self, *argv: str, options: tuple[str, ...] = (), **settings: str) -> str:
        name = f"mailgun-sync-smoke-{secrets.token_hex(4)}"
        done = await docker("run", "--detach", *self.hardened(name), *options, *self.settings(**settings),
                            self.image, *argv)
        assert done.code == 0, done.err
        return name

    async def migrate(self) -> None:
        done = await self.run("migrate")
        assert done.code == 0, done.out + done.err

    async def emulator(self, *extra: str) -> str:
        """The image's own Mailgun emulator, serving DOMAIN's bounces; its base URL."""
        port = free_port()
        name = f"mailgun-sync-smoke-emulator-{secrets.token_hex(4)}"
        self.names.append(name)
        done = await docker("run", "--detach", "--name", name, "--network", "host", "--read-only",
                            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", self.image,
                            "emulator", "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
                            "--domain", DOMAIN, "--generate", f"bounces={BOUNCES}", *extra)
        assert done.code == 0, done.err
        base_url = f"http://127.0.0.1:{port}"
        await wait_for_http(f"{base_url}/_emulator/state", name)
        return base_url

    async def logs(self, name: str) -> str:
        done = await docker("logs", "--tail", "40", name)
        return (done.out + done.err)[-4000:]

    async def inspect(self, name: str) -> dict[str, Any]:
        done = await docker("inspect", name)
        assert done.code == 0, done.err
        [found] = json.loads(done.out)
        return found  # type: ignore[no-any-return]

    async def remove_all(self) -> None:
        if self.names:
            await docker("rm", "--force", "--volumes", *self.names)


async def wait_for_http(url: str, container: str, *, deadline_s: float = READY_DEADLINE_S) -> None:
    """Poll `url` until it answers 200; fail with the container's logs when it does not in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while loop.time() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    done = await docker("logs", "--tail", "40", container)
    raise AssertionError(f"{url} did not answer 200 within {deadline_s} s: {done.out}{done.err}")


@pytest.fixture
async def containers(image: str, empty_database_url: str, tmp_path: Path) -> AsyncIterator[Containers]:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o755)
    secrets_dir.chmod(0o755)  # the container's user reads it; the umask may have narrowed it
    running = Containers(image, secrets_dir, empty_database_url)
    running.secret("DATABASE_URL", empty_database_url)
    running.secret("MAILGUN_API_KEY", API_KEY)
    try:
        yield running
    finally:
        await running.remove_all()


def process_status(pid: int) -> str:
    path = Path(f"/proc/{pid}/status")
    return path.read_text() if path.exists() else ""


async def bounces_in_mirror(url: str) -> int:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        count: int = await connection.fetchval("SELECT count(*) FROM mailgun.bounces")
        return count
    finally:
        await connection.close()


async def test_the_image_runs_mailgun_sync_as_the_manifests_user_with_a_healthcheck(image: str) -> None:
    done = await docker("image", "inspect", image)
    [config] = [found["Config"] for found in json.loads(done.out)]
    assert config["User"] == USER
    assert config["Entrypoint"] == ["mailgun-sync"]
    assert config["Cmd"] == ["daemon"]
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])


async def test_the_image_carries_no_pip_and_no_embedded_postgresql(image: str) -> None:
    done = await docker("run", "--rm", "--network", "host", "--entrypoint", "python", image,
                        "-c", "import importlib.util as u; print([m for m in ('pip', 'setuptools', "
                        "'pgserver') if u.find_spec(m)])")
    assert done.code == 0, done.err
    assert done.out.strip() == "[]"


async def test_the_image_adds_less_than_its_size_budget_to_the_base_image(image: str) -> None:
    """README (Docker and Kubernetes) states what the image adds to python:3.11-slim."""
    done = await docker("image", "inspect", "--format", "{{.Size}}", image, "python:3.11-slim")
    assert done.code == 0, done.err
    ours, base = map(int, done.out.split())
    assert ours - base < ADDED_BYTES_BUDGET, f"{(ours - base) / 1e6:.1f} MB"


async def test_migrate_creates_the_schema_on_a_read_only_root_filesystem(containers: Containers) -> None:
    done = await containers.run("migrate")
    assert done.code == 0, done.out + done.err
    connection = await asyncpg.connect(containers.database_url, timeout=10)
    try:
        applied = await connection.fetchval("SELECT count(*) FROM mailgun.schema_migrations")
    finally:
        await connection.close()
    assert applied > 0


async def test_run_mirrors_the_lists_of_the_emulator_in_the_image(containers: Containers) -> None:
    api_base = await containers.emulator()
    await containers.migrate()
    done = await containers.run("run", "--json", MAILGUN_DOMAINS=DOMAIN, MAILGUN_API_BASE=api_base)
    assert done.code == 0, done.out + done.err
    report = json.loads(done.out)
    assert {result["status"] for result in report["results"]} == {"ok"}
    assert await bounces_in_mirror(containers.database_url) == BOUNCES


async def test_the_daemon_becomes_ready_and_healthy_as_its_user_and_cannot_write_its_root(
        containers: Containers) -> None:
    api_base = await containers.emulator()
    await containers.migrate()
    port = free_port()
    # The image's HEALTHCHECK command, checked every second rather than every 30 s.
    name = await containers.start(
        "daemon", options=("--health-interval", "1s", "--health-start-period", "30s"),
        MAILGUN_DOMAINS=DOMAIN, MAILGUN_API_BASE=api_base, HTTP_PORT=str(port), SYNC_JITTER="0")
    await wait_for_http(f"http://127.0.0.1:{port}/readyz", name)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_DEADLINE_S
    while (state := (await containers.inspect(name))["State"])["Health"]["Status"] != "healthy":
        assert state["Running"], await containers.logs(name)
        assert loop.time() < deadline, f"not healthy: {state['Health']}"
        await asyncio.sleep(0.5)

    # The process itself, as the host's kernel sees it: the manifests' user and group.
    status = await asyncio.to_thread(process_status, state["Pid"])
    if status:  # an engine on another host (a VM) shows no process here
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        gids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Gid:"))
        assert set(uids) == {"10001"} and set(gids) == {"10001"}
    written = await docker("exec", name, "python", "-c", "open('/opt/mailgun-sync/x', 'w')")
    assert written.code != 0 and "Read-only file system" in written.err

    # The first runs of the (migrated) mirror's lists are done and counted in /metrics.
    async with aiohttp.ClientSession() as session:
        for _ in range(150):
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                metrics = await response.text()
            if 'mailgun_sync_runs_total{domain="mg.example.com",list="bounces",status="ok"} 1.0' in metrics:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(await containers.logs(name))
    assert await bounces_in_mirror(containers.database_url) == BOUNCES


async def test_sigterm_lets_the_run_in_progress_finish_then_the_daemon_exits_0_within_the_grace(
        containers: Containers) -> None:
    settings, termination_grace = deployed()
    api_base = await containers.emulator()
    await containers.migrate()
    async with aiohttp.ClientSession() as session:
        # The first request of the bounces' pull is parked until released: a run in progress.
        hold = {"action": "hold", "method": "GET", "domain": DOMAIN, "list": "bounces"}
        async with session.post(f"{api_base}/_emulator/faults", json=hold) as response:
            assert response.status == 200
        port = free_port()
        name = await containers.start("daemon", MAILGUN_DOMAINS=DOMAIN, MAILGUN_API_BASE=api_base,
                                      HTTP_PORT=str(port), SYNC_JITTER="0",
                                      SHUTDOWN_GRACE=settings["SHUTDOWN_GRACE"])
        await wait_for_http(f"http://127.0.0.1:{port}/readyz", name)
        for _ in range(150):
            async with session.get(f"{api_base}/_emulator/state") as response:
                if (await response.json())["held"]:
                    break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(await containers.logs(name))

        started = time.monotonic()
        assert (await docker("kill", "--signal", "TERM", name)).code == 0
        await asyncio.sleep(RUN_LEFT_S)  # the daemon waits for the run meanwhile
        assert (await containers.inspect(name))["State"]["Running"]
        async with session.post(f"{api_base}/_emulator/release") as response:
            assert response.status == 200
        waited = await docker("wait", name, seconds=termination_grace + 30)
        seconds = time.monotonic() - started

    logs = await containers.logs(name)
    assert waited.out.strip() == "0", logs
    assert RUN_LEFT_S <= seconds < termination_grace, logs
    assert await bounces_in_mirror(containers.database_url) == BOUNCES, "the run was let finish"
    assert '"event": "daemon_stopped"' in logs
