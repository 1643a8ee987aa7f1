"""`python -m worker emulator` as a real process: it serves the seeded lists, takes faults over its
control endpoint, stops cleanly on SIGTERM, and refuses a seed it cannot load with exit code 2."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

from worker.emulator import MailgunEmulator
from worker.emulator.faults import ACTIONS
from worker.settings import Settings

CLI_DOMAIN = "mg.example.com"
CLI_KEY = "key-x"
AUTH = {"Authorization": aiohttp.encode_basic_auth("api", CLI_KEY)}
START_DEADLINE_S = 15.0
STOP_DEADLINE_S = 5.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class RunningEmulator:
    process: asyncio.subprocess.Process
    base_url: str
    output: Path


async def start_emulator(tmp_path: Path, *extra: str) -> tuple[asyncio.subprocess.Process, Path]:
    """The emulator command in a child process; its stdout and stderr go to one file (no pipe to fill)."""
    output = tmp_path / "output.txt"
    with output.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "emulator", *extra,
            stdout=sink, stderr=sink, stdin=asyncio.subprocess.DEVNULL)
    return process, output


async def wait_until_answering(process: asyncio.subprocess.Process, base_url: str, output: Path) -> None:
    """Poll the control endpoint until it answers 200, the process dies, or the deadline passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_DEADLINE_S
    async with aiohttp.ClientSession() as session:
        while True:
            if process.returncode is not None:
                said = await asyncio.to_thread(output.read_text)
                raise AssertionError(f"emulator exited early with code {process.returncode}: {said}")
            try:
                async with session.get(f"{base_url}/_emulator/state") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if loop.time() > deadline:
                said = await asyncio.to_thread(output.read_text)
                raise AssertionError(f"emulator did not answer within {START_DEADLINE_S} s: {said}")
            await asyncio.sleep(0.05)


@pytest.fixture
def seed_file(tmp_path: Path) -> Path:
    seed = tmp_path / "seed.json"
    seed.write_bytes(orjson.dumps({"domains": {CLI_DOMAIN: {
        "bounces": [{"address": f"user{i:02}@example.com", "code": "550"} for i in range(25)],
        "complaints": [{"address": "angry@example.com"}],
    }}}))
    return seed


@pytest.fixture
async def running(tmp_path: Path, seed_file: Path) -> AsyncIterator[RunningEmulator]:
    port = free_port()
    process, output = await start_emulator(
        tmp_path, "--port", str(port), "--seed", str(seed_file),
        "--domain", CLI_DOMAIN, "--api-key", CLI_KEY)
    try:
        base_url = f"http://127.0.0.1:{port}"
        await wait_until_answering(process, base_url, output)
        yield RunningEmulator(process, base_url, output)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.slow
async def test_cli_emulator_pages_the_seeded_list_with_basic_auth(running):
    async with aiohttp.ClientSession(headers=AUTH) as session:
        url: str | None = f"{running.base_url}/v3/{CLI_DOMAIN}/bounces?limit=10"
        seen: list[str] = []
        pages = 0
        while url is not None and pages < 10:
            async with session.get(url) as response:
                assert response.status == 200
                page = await response.json()
            pages += 1
            if not page["items"]:
                break
            seen.extend(item["address"] for item in page["items"])
            url = page["paging"]["next"]
        assert seen == [f"user{i:02}@example.com" for i in range(25)]
        assert pages == 4
        async with session.get(f"{running.base_url}/v3/{CLI_DOMAIN}/complaints") as response:
            assert [i["address"] for i in (await response.json())["items"]] == ["angry@example.com"]

    wrong_key = {"Authorization": aiohttp.encode_basic_auth("api", "key-wrong")}
    async with (aiohttp.ClientSession(headers=wrong_key) as session,
                session.get(f"{running.base_url}/v3/{CLI_DOMAIN}/bounces") as response):
        assert response.status == 401
        assert await response.text() == "Forbidden"


@pytest.mark.slow
async def test_cli_emulator_serves_an_injected_fault_once(running):
    async with aiohttp.ClientSession() as control:
        async with control.post(f"{running.base_url}/_emulator/faults",
                                json={"status": 503, "list": "bounces", "times": 1}) as response:
            assert response.status == 200
        async with control.get(f"{running.base_url}/_emulator/state") as response:
            state = await response.json()
        assert [(f["status"], f["list"]) for f in state["faults"]] == [(503, "bounces")]
        assert state["domains"][CLI_DOMAIN]["bounces"] == 25

    async with aiohttp.ClientSession(headers=AUTH) as session:
        url = f"{running.base_url}/v3/{CLI_DOMAIN}/bounces"
        async with session.get(url) as response:
            assert response.status == 503
            assert await response.json() == {"message": "Internal Server Error"}
        async with session.get(url) as response:
            assert response.status == 200


@pytest.mark.slow
async def test_cli_emulator_exits_0_on_sigterm_and_stops_listening(running):
    running.process.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(running.process.wait(), timeout=STOP_DEADLINE_S)
    assert code == 0, running.output.read_text()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{running.base_url}/_emulator/state")


@pytest.mark.slow
@pytest.mark.parametrize("content", [None, b'{"domains": '], ids=["missing", "not-json"])
async def test_cli_emulator_with_an_unloadable_seed_exits_2_with_one_line_naming_seed(tmp_path, content):
    seed = tmp_path / "seed.json"
    if content is not None:
        seed.write_bytes(content)
    process, output = await start_emulator(
        tmp_path, "--port", str(free_port()), "--seed", str(seed),
        "--domain", CLI_DOMAIN, "--api-key", CLI_KEY)
    code = await asyncio.wait_for(process.wait(), timeout=START_DEADLINE_S)

    assert code == 2
    lines = output.read_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("mailgun-sync: --seed: ")
    assert str(seed) in lines[0]


@pytest.mark.slow
async def test_an_unknown_fault_action_is_refused_listing_the_valid_ones(running):
    async with aiohttp.ClientSession() as control, \
            control.post(f"{running.base_url}/_emulator/faults", json={"action": "nope"}) as response:
        assert response.status == 400
        message = (await response.json())["message"]
    assert message.startswith("bad fault: unknown fault action 'nope' (valid actions: status, delay, ")
    assert all(action in message for action in ACTIONS)


@pytest.mark.slow
async def test_a_reset_keeps_the_domains_declared_at_start_empty(running):
    async with aiohttp.ClientSession() as control:
        async with control.post(f"{running.base_url}/_emulator/domains/mg.other.example.org") as response:
            assert response.status == 200
        async with control.post(f"{running.base_url}/_emulator/reset") as response:
            assert response.status == 200
        async with control.get(f"{running.base_url}/_emulator/state") as response:
            state = await response.json()
    empty = dict.fromkeys(("bounces", "unsubscribes", "complaints", "allowlist"), 0)
    assert state["domains"] == {CLI_DOMAIN: empty}
    async with aiohttp.ClientSession(headers=AUTH) as session, \
            session.get(f"{running.base_url}/v3/{CLI_DOMAIN}/bounces") as response:
        assert response.status == 200  # not "Domain not found"
        assert (await response.json())["items"] == []


@pytest.mark.slow
async def test_v4_domains_as_the_javascript_sdk_asks_answers_as_v3_domains(running):
    async with aiohttp.ClientSession(headers=AUTH) as session:
        for query in ("", "?limit=1", "?skip=1&limit=10"):
            async with session.get(f"{running.base_url}/v3/domains{query}") as v3, \
                    session.get(f"{running.base_url}/v4/domains{query}") as v4:
                assert (v3.status, v4.status) == (200, 200)
                assert await v4.json() == await v3.json()
        async with session.get(f"{running.base_url}/v4/domains") as response:
            listing = await response.json()
    assert listing["total_count"] == 1
    assert [item["name"] for item in listing["items"]] == [CLI_DOMAIN]
    wrong_key = {"Authorization": aiohttp.encode_basic_auth("api", "key-wrong")}
    async with aiohttp.ClientSession(headers=wrong_key) as session, \
            session.get(f"{running.base_url}/v4/domains") as response:
        assert response.status == 401


async def test_an_emulator_on_an_ipv6_host_gives_a_bracketed_base_url_the_worker_takes():
    async with MailgunEmulator(api_key=CLI_KEY, domains=[CLI_DOMAIN]) as emulator:
        await emulator.stop()
        base_url = await emulator.start("::1", 0)
        assert re.fullmatch(r"http://\[::1\]:\d+", base_url), base_url
        settings = Settings.from_env({"MAILGUN_API_KEY": CLI_KEY, "MAILGUN_API_BASE": base_url})
        assert settings.api_base == base_url
        async with aiohttp.ClientSession(headers=AUTH) as session, \
                session.get(f"{base_url}/v3/{CLI_DOMAIN}/bounces") as response:
            assert response.status == 200


def test_the_emulators_readme_shows_a_curl_example_of_every_control_endpoint():
    readme = (Path(__file__).parent.parent / "worker" / "emulator" / "README.md").read_text()
    routes = {(route.method, route.resource.canonical) for route in MailgunEmulator().app.router.routes()
              if route.resource is not None and route.resource.canonical.startswith("/_emulator")
              and route.method != "HEAD"}  # aiohttp's own, beside each GET
    assert routes
    for method, path in routes:
        # `{domain}` in the route is an example domain in the curl line.
        pattern = re.escape(path).replace(r"\{domain\}", r"[\w.-]+").replace(r"\{list\}", r"[a-z]+")
        flag = "" if method == "GET" else rf"-X {method} "
        assert re.search(rf"curl -s {flag}\$E{pattern}\b", readme), (method, path)
        assert f"`{method} {path.replace('{domain}', '<domain>').replace('{list}', '<list>')}`" in readme
