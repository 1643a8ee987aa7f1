"""Security properties: the key and the database password stay secret, and the key goes only where
it should; SQL is parameterised; request bodies are bounded."""

from __future__ import annotations

import asyncio
import io
import os
import re
import string
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from tests.support.account import API_KEY, DOMAIN
from tests.support.cli import BASIC_AUTH
from tests.support.daemon_process import start_daemon, stop
from tests.support.webhooks import SIGNING_KEY
from worker import errors
from worker.database import open_pool
from worker.devtools.embedded import embedded_postgres
from worker.devtools.sql import queries
from worker.emulator import Fault, MailgunEmulator
from worker.metrics import Metrics
from worker.records import SuppressionList
from worker.report import list_status
from worker.store import DATA_COLUMNS, list_query

BOUNCES = SuppressionList.BOUNCES
ROOT = Path(__file__).resolve().parents[1]


async def test_the_key_appears_in_no_log_error_table_status_or_metric(
        pool, store, emulator, make_client, make_reconciler):
    metrics = Metrics()
    client = make_client(observer=metrics)
    await pool.execute("INSERT INTO mailgun.bounces (domain, address) VALUES ($1, 'p@example.com')", DOMAIN)
    emulator.seed(DOMAIN, BOUNCES, [{"address": "r@example.com"}])
    emulator.inject(Fault(status=401, times=None, method="POST"))
    emulator.inject(Fault(status=503, times=2, method="GET"))

    with capture_logs() as logs:
        result = await make_reconciler(client=client).reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
        metrics.observe_run(result, 1.0)

    assert result.status == "failed"
    tables = [str(tuple(r)) for t in ("sync_runs", "changes", "bounces")
              for r in await pool.fetch(f"SELECT * FROM mailgun.{t}")]
    status = str(await list_status(store, [DOMAIN]))
    for text in (str(result.error), str(logs), metrics.exposition().decode(), status, *tables):
        assert API_KEY not in text
        assert BASIC_AUTH not in text


@pytest.mark.parametrize("quoted", ["the key", "the Authorization header"])
async def test_a_refusal_quoting_the_key_it_refused_shows_it_nowhere(
        quoted, pool, store, emulator, make_client, make_reconciler):
    # Mailgun answers "Forbidden"; a gateway in front of it may quote what it refused.
    secret = API_KEY if quoted == "the key" else BASIC_AUTH.split()[-1]
    await pool.execute("INSERT INTO mailgun.bounces (domain, address) VALUES ($1, 'p@example.com')", DOMAIN)
    emulator.inject(Fault(status=403, times=None, method="GET", message=f"Invalid private key {secret}"))
    emulator.inject(Fault(status=400, times=None, method="POST", message=f"bad auth {secret}"))

    with capture_logs() as logs:
        pulled = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)
        emulator.faults.clear()
        emulator.inject(Fault(status=400, times=None, method="POST", message=f"bad auth {secret}"))
        pushed = await make_reconciler().reconcile(uuid.uuid4(), DOMAIN, BOUNCES)

    assert "Mailgun refused the request (403 Invalid private key [redacted])" in str(pulled.error)
    assert pushed.rejected == 1
    tables = [str(tuple(r)) for t in ("sync_runs", "changes", "bounces")
              for r in await pool.fetch(f"SELECT * FROM mailgun.{t}")]
    status = str(await list_status(store, [DOMAIN]))
    for text in (str(pulled.error), str(logs), status, *tables):
        assert secret not in text
    assert "bad auth [redacted]" in " ".join(tables)


async def test_the_key_goes_only_to_the_configured_origin(emulator, make_client):
    async with MailgunEmulator(api_key=API_KEY, domains=[DOMAIN]) as elsewhere:
        emulator.seed(DOMAIN, BOUNCES, [{"address": f"a{i}@example.com"} for i in range(6)])
        emulator.inject(Fault(action="foreign_next", foreign_origin=elsewhere.base_url))
        with pytest.raises(errors.PagingError):
            _ = [p async for p in make_client(page_limit=2).pages(DOMAIN, BOUNCES)]
        emulator.inject(Fault(status=307, times=None))
        with pytest.raises(errors.MailgunRejectedError, match="redirect"):
            _ = [p async for p in make_client().pages(DOMAIN, BOUNCES)]
        assert len(elsewhere.requests) == 0


def test_sql_placeholders_are_fixed_identifiers_never_values():
    """Values are $n parameters; the only text put into SQL is a fixed table of identifiers."""
    for name, text in queries().items():
        unquoted = re.sub(r"'[^']*'", "''", text)  # array literals such as '{*}' are values
        for placeholder in re.findall(r"\{(\w+)\}", unquoted):
            assert placeholder in {"table", "list", "cols", "r_cols", "m_cols", "set_cols", "address",
                                   "address_key", "database"}, name
    for kind, columns in DATA_COLUMNS.items():
        assert all(re.fullmatch(r"[a-z_]+", c) for pair in columns for c in pair)
        assert not re.search(r"\{\w+\}", re.sub(r"'[^']*'", "''", list_query("build_diff", kind)))


def test_no_python_module_builds_sql_from_strings():
    pattern = re.compile(r"[\"'](SELECT .+ FROM|INSERT INTO|UPDATE \w+ SET|DELETE FROM|CREATE (TABLE|INDEX|"
                         r"DATABASE)|DROP (TABLE|DATABASE)|ALTER (TABLE|DATABASE)|TRUNCATE |SHOW )")
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "worker").rglob("*.py")
                 if pattern.search(path.read_text())]
    assert offenders == []


async def test_the_emulator_bounds_request_bodies(emulator):
    headers = {"Authorization": aiohttp.encode_basic_auth("api", API_KEY), "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        too_big = io.BytesIO(b"[" + b" " * (33 * 1024 * 1024) + b"]")
        async with session.post(f"{emulator.base_url}/v3/{DOMAIN}/bounces", data=too_big,
                                headers=headers) as response:
            assert response.status == 413


# ---- the database password -----------------------------------------------------------------------
# A password goes into DATABASE_URL, where an unencoded /, #, ?, @ or % changes where the URL's
# parts begin and end: any part of the URL may then be a piece of the password. The URL is checked
# when settings are read, before anything connects, and no error shows a part of it.

CORE = ("Xk9", "mZ2q")  # around each special sequence, so that every 3-character window is telling
SPECIALS = [*string.punctuation, "/#?", "@@", ":/@", " ", "  ", "%%", "%zz", "%41", "\t", "ü", "5432/",
            "?qZ7=vW3&", "'\"\\", "${HOME}", "[::1]", string.punctuation]
PASSWORDS = [CORE[0] + special + CORE[1] for special in SPECIALS]
# What a URL's password may hold unencoded (RFC 3986); anything else must be percent-encoded.
URL_SAFE = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:]|%[0-9A-Fa-f]{2})*")
NO_SUCH_DATABASE = "mailgun_sync_no_such_database"
# Every command that connects to the mirror, with what else it needs; Mailgun is never reached.
DATABASE_COMMANDS = {
    "run": ["run", "--json"],
    "backfill": ["backfill"],
    "daemon": ["daemon", "--http-port", "0"],
    "status": ["status"],
    "prune": ["prune"],
    "migrate": ["migrate"],
}
MAILGUN_ENV = {"MAILGUN_API_KEY": API_KEY, "MAILGUN_DOMAINS": DOMAIN, "MAILGUN_API_BASE": "http://127.0.0.1:9"}


def fragments(password: str) -> set[str]:
    """Every 3-character piece of the password, as written and as the driver would decode it."""
    return {text[i:i + 3] for text in (password, unquote(password)) for i in range(len(text) - 2)}


def assert_no_fragment(text: str, *passwords: str) -> None:
    shown = sorted(f for password in passwords for f in fragments(password) if f in text)
    assert not shown, f"pieces of the password {shown} in: {text!r}"


def url_with_password(password: str, host: str = "127.0.0.1:5432", database: str = NO_SUCH_DATABASE) -> str:
    return f"postgresql://postgres:{password}@{host}/{database}"


@pytest.mark.parametrize("command", DATABASE_COMMANDS)
async def test_no_command_shows_a_piece_of_a_database_password_whatever_it_holds(invoke, tmp_path, command):
    """For each password, given in DATABASE_URL, in --database-url or in DATABASE_URL_FILE: one a
    URL cannot hold unencoded is refused before connecting (exit 2, one line saying how to write
    it); any other reaches PostgreSQL, whose refusal (no such database) shows none of it either."""
    url_file = tmp_path / "database-url"
    for password in PASSWORDS:
        url = url_with_password(password)
        url_file.write_text(url + "\n")
        for env, flags, setting in (
                ({"DATABASE_URL": url}, [], "DATABASE_URL"),
                ({"DATABASE_URL_FILE": str(url_file)}, [], "DATABASE_URL_FILE"),
                ({"DATABASE_URL": "postgresql://unused@127.0.0.1:1/unused"}, ["--database-url", url],
                 "DATABASE_URL")):
            outcome = await invoke(*DATABASE_COMMANDS[command], *flags, env={**MAILGUN_ENV, **env})

            # The file's path is the user's to see, and pytest's numbered directory may hold a
            # piece of a password by chance (`pytest-32/` and `5432/`).
            assert_no_fragment((outcome.out + outcome.err).replace(str(url_file), "<file>"), password)
            assert "Traceback" not in outcome.err, password
            [line] = [line for line in outcome.err.splitlines() if line.startswith("mailgun-sync: ")]
            if URL_SAFE.fullmatch(password):
                assert (outcome.code, line.startswith("mailgun-sync: PostgreSQL ")) == (1, True), line
            else:
                assert (outcome.code, outcome.out, outcome.err.splitlines()) == (2, "", [line]), password
                assert line.startswith(f"mailgun-sync: {setting}: "), line
                assert "cannot be parsed as postgresql://" in line
                assert "percent-encode the user name and password" in line
                assert "DATABASE_URL_FILE" in line


@pytest.mark.slow
def test_a_real_process_shows_no_piece_of_the_password():
    """As the process runs: its own logging set-up, its stderr, its exit status."""
    password = "Xk9/#?@mZ2q"
    env = {"PATH": os.environ["PATH"], **MAILGUN_ENV, "DATABASE_URL": url_with_password(password)}
    processes = {command: subprocess.Popen([sys.executable, "-m", "worker", *DATABASE_COMMANDS[command]],
                                           env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for command in ("daemon", "migrate")}  # a command reading every setting, and one not
    for command, process in processes.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 2, (command, err)
        assert err.startswith("mailgun-sync: DATABASE_URL: cannot be parsed as postgresql://"), command
        assert (out, len(err.splitlines())) == ("", 1), command
        assert_no_fragment(out + err, password)


async def test_a_query_the_driver_cannot_read_is_one_line_showing_none_of_it(invoke):
    """The driver reads the query itself (a port, sslmode) and quotes what it cannot use: only the
    kind of error is shown."""
    for query in ("port=Xk9mZ2q", "sslmode=Xk9mZ2q"):
        outcome = await invoke("migrate", env={
            "DATABASE_URL": f"postgresql://postgres@/{NO_SUCH_DATABASE}?host=127.0.0.1&{query}"})
        assert (outcome.code, outcome.out) == (2, "")
        [line] = outcome.err.splitlines()
        assert line.startswith("mailgun-sync: DATABASE_URL: the driver cannot use it ("), line
        assert_no_fragment(line, "Xk9mZ2q")


@pytest.mark.parametrize("password", [p for p in PASSWORDS if not URL_SAFE.fullmatch(p)])
async def test_a_url_given_to_the_pool_unchecked_fails_showing_no_piece_of_the_password(password):
    """Without the settings' check too: what the driver cannot parse is reported by its kind of
    error, and what it misreads fails to connect."""
    with pytest.raises(errors.SyncError) as caught:
        async with open_pool(url_with_password(password, host="127.0.0.1:1")):
            pass
    assert_no_fragment(str(caught.value), password)


# A server that checks passwords (SCRAM), for a role whose password holds every special character.
ROLE_PASSWORD = string.punctuation + " Xk9 ü mZ2q"
WRONG_PASSWORD = "Wr0ng" + string.punctuation[::-1] + "qP7"


@pytest.fixture(scope="module")
def password_server() -> Iterator[str]:
    """An embedded PostgreSQL where the role `mirror` (owner of database `mirror`) logs in with
    ROLE_PASSWORD only; yields the mirror's URL without user and password."""
    with tempfile.TemporaryDirectory(prefix="mailgun-sync-pg-") as data_dir, \
            embedded_postgres(Path(data_dir)) as admin_url:
        async def set_up() -> None:
            connection = await asyncpg.connect(admin_url)
            try:
                quoted = "'" + ROLE_PASSWORD.replace("'", "''") + "'"
                await connection.execute(f"CREATE ROLE mirror LOGIN PASSWORD {quoted}")
                await connection.execute("CREATE DATABASE mirror OWNER mirror")
                hba = Path(await connection.fetchval("SHOW hba_file"))
                rules = "local all postgres trust\nlocal all all scram-sha-256\n"
                await asyncio.to_thread(hba.write_text, rules)
                await connection.fetchval("SELECT pg_reload_conf()")
            finally:
                await connection.close()

        asyncio.run(set_up())
        [socket_dir] = parse_qs(urlsplit(admin_url).query)["host"]
        yield f"@/mirror?host={socket_dir}"


def mirror_url(password_server: str, password: str) -> str:
    return f"postgresql://mirror:{quote(password, safe='')}{password_server}"


@pytest.mark.slow
async def test_a_password_of_every_special_character_works_percent_encoded(invoke, tmp_path, password_server):
    url_file = tmp_path / "database-url"
    url_file.write_text(mirror_url(password_server, ROLE_PASSWORD) + "\n")

    migrated = await invoke("migrate", env={"DATABASE_URL": mirror_url(password_server, ROLE_PASSWORD)})
    status = await invoke("status", env={"DATABASE_URL_FILE": str(url_file)})

    assert migrated.code == 0, migrated.err
    assert migrated.out.startswith("applied migrations [")
    assert status.code == 0, status.err


@pytest.mark.slow
@pytest.mark.parametrize("command", DATABASE_COMMANDS)
async def test_a_refused_password_or_an_unreachable_server_shows_no_piece_of_a_password(
        invoke, password_server, command):
    cases = [  # (URL, the start of the one line saying why)
        (mirror_url(password_server, WRONG_PASSWORD),
         'PostgreSQL failed while connecting: InvalidPasswordError: password authentication failed '
         'for user "mirror"'),
        (f"postgresql://mirror:{quote(WRONG_PASSWORD, safe='')}@127.0.0.1:1/mirror",
         "PostgreSQL could not be reached while connecting: "),
        (f"postgresql://mirror:{quote(WRONG_PASSWORD, safe='')}@db.invalid:5432/mirror",
         "PostgreSQL could not be reached while connecting: "),
    ]
    for url, why in cases:
        outcome = await invoke(*DATABASE_COMMANDS[command], env={**MAILGUN_ENV, "DATABASE_URL": url})

        assert outcome.code == 1, outcome.err
        [line] = [line for line in outcome.err.splitlines() if line.startswith("mailgun-sync: ")]
        assert line.startswith(f"mailgun-sync: {why}"), line
        assert_no_fragment(outcome.out + outcome.err, WRONG_PASSWORD, ROLE_PASSWORD)


# ---- secrets from files --------------------------------------------------------------------------


async def until_ready(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            async with session.get(f"{base}/readyz") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError("the daemon did not become ready")


@pytest.mark.slow
async def test_every_secret_can_come_from_a_file_as_docker_and_kubernetes_mount_them(
        invoke, emulator, database_url, pool, tmp_path):
    """Each file as `echo` writes it, with a trailing newline; the daemon reads all three, `run` the
    key and the URL, `status` the URL, `webhook-test` the signing key."""
    files = {}
    for name, value in (("MAILGUN_API_KEY", API_KEY), ("DATABASE_URL", database_url),
                        ("MAILGUN_WEBHOOK_SIGNING_KEY", SIGNING_KEY)):
        (tmp_path / name).write_text(value + "\n")
        files[f"{name}_FILE"] = str(tmp_path / name)
    emulator.seed(DOMAIN, BOUNCES, [{"address": "remote@example.com"}])

    ran = await invoke("run", "--json", env={
        "MAILGUN_API_KEY_FILE": files["MAILGUN_API_KEY_FILE"],
        "DATABASE_URL_FILE": files["DATABASE_URL_FILE"],
        "MAILGUN_API_BASE": str(emulator.base_url), "MAILGUN_DOMAINS": DOMAIN})
    status = await invoke("status", "--json", env={"DATABASE_URL_FILE": files["DATABASE_URL_FILE"]})
    # The variables start_daemon sets, emptied: an empty variable is an unset one.
    daemon, base = await start_daemon(emulator, database_url, MAILGUN_API_KEY="", DATABASE_URL="", **files)
    try:
        await until_ready(base)  # webhooks are answered 503 until its domains are planned
        key_file = {"MAILGUN_WEBHOOK_SIGNING_KEY_FILE": files["MAILGUN_WEBHOOK_SIGNING_KEY_FILE"]}
        tested = await invoke("webhook-test", "--url", f"{base}/webhooks/mailgun", "--domain", DOMAIN,
                              env=key_file)
    finally:
        assert await stop(daemon) == 0

    assert ran.code == 0, ran.err
    assert ran.result(DOMAIN, "bounces")["inserted"] == 1
    assert status.code == 0, status.err
    assert status.lists()[(DOMAIN, "bounces")]["status"] == "ok"
    assert tested.code == 0, tested.out
    assert "all answers as expected" in tested.out


@pytest.mark.parametrize("argv", [
    ["daemon", "--signing-key", "whk-S3cretKey9"],  # the README's flag, given to the daemon
    ["run", "--signing-key", "whk-S3cretKey9"],
    ["migrate", "--databse-url", "postgresql://mirror:S3cretKey9@db.internal/app"],  # a typo
    ["webhook-test", "--url", "http://127.0.0.1:9/webhooks/mailgun",
     "--database-url", "postgresql://mirror:S3cretKey9@db.internal/app"],
    ["status", "postgresql://mirror:S3cretKey9@db.internal/app"],  # the URL as an argument
])
async def test_a_secret_given_in_a_misplaced_argument_is_not_echoed_in_the_error(invoke, argv):
    # README: the API key, the database password and the webhook signing key "appear in no log
    # line, error or report".
    outcome = await invoke(*argv, env={})
    assert outcome.code == 2
    assert "S3cretKey9" not in outcome.out + outcome.err, outcome.err


async def test_a_password_given_in_the_query_shows_no_piece_of_itself_when_it_holds_an_ampersand(invoke):
    # README: the driver's query parameters are taken, and the driver reads `password=` there. An
    # unencoded & in that password passes the URL check; what follows it is sent to the server as
    # a setting's name, which the server's refusal quotes.
    password = "Xk9&mZ2q=Pw7"
    outcome = await invoke("status", env={
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/postgres?password={password}"})
    assert outcome.code in (1, 2)
    shown = sorted(piece for piece in {password[i:i + 3] for i in range(len(password) - 2)}
                   if piece in outcome.out + outcome.err)
    assert not shown, f"pieces of the password {shown} in: {outcome.err!r}"


MISPLACED = "S3cretKey9"
MISPLACED_URL = f"postgresql://mirror:{MISPLACED}@db.internal/app"
QUOTED_URL = "postgresql://mirror:S3c'retKey9@db.internal/app"  # a ' needs no percent-encoding


@pytest.mark.parametrize("argv", [
    ["run", f"--d={MISPLACED_URL}"],  # an abbreviation that could match --domain, --dry-run, --database-url
    ["run", f"--ma={MISPLACED}"],
    ["run", f"--dry-run={MISPLACED}"],  # "ignored explicit argument"
    ["status", f"--json={MISPLACED}"],
    [QUOTED_URL],  # a URL given where the command was expected, with a ' in its password
    ["run", "--list", "S3c'retKey9"],
    ["run", "--domain", "mg.example.com", "--backoff-max", MISPLACED_URL],  # a secret to the wrong flag
    ["run", "--domain", "mg.example.com", "--api-base", f"key-{MISPLACED}"],
    ["run", "--domain", "mg.example.com", "--max-attempts", f"key-{MISPLACED}"],
    ["daemon", "--domain", "mg.example.com", "--http-port", MISPLACED],
    ["run", f"-p{MISPLACED}"],
    ["--log-level", MISPLACED, "run"],  # upper-cased by the parser before it is refused
    ["run", "--domain", "mg.example.com", "--max-attempts", "S3c\\retKey9"],  # repr() doubles its backslash
    ["run", "--domain", "mg.example.com", "--max-attempts", "S3cretKey9s"],  # beside a longer one
    ["run", "--domain", "mg.example.com", "--max-attempts", "S3cretKey9s", "--jitter", "S3cretKey9"],
], ids=["ambiguous-abbrev-with-eq", "ambiguous-abbrev", "store-true-with-eq", "json-with-eq",
        "command-url-with-quote", "list-choice-with-quote", "backoff-max-given-url",
        "api-base-given-key", "max-attempts-given-key", "http-port-given-secret", "short-option-attached",
        "log-level-upper-cased", "max-attempts-given-a-backslash", "a-value-ending-in-a-letter",
        "a-value-and-its-start"])
async def test_no_error_echoes_a_value_given_on_the_command_line(invoke, argv):
    # Argparse quotes, cases or cuts values in many ways, and a setting's check quotes what it
    # refuses.
    outcome = await invoke(*argv, env={"MAILGUN_API_KEY": API_KEY})
    assert outcome.code == 2
    assert "s3c" not in (outcome.out + outcome.err).lower(), outcome.err


@pytest.mark.parametrize(("argv", "kept", "hidden"), [
    (["run", "--list", "bounce"], "(choose from 'bounces', 'unsubscribes',", "'bounce'"),
    (["webhook-test", "--url", "http://", "--signing-key", "k", "--domain", DOMAIN],
     "is not an http:// or https:// URL", None),
    (["webhook-test", "--url", "http:", "--signing-key", "k", "--domain", DOMAIN],
     "is not an http:// or https:// URL", None),
    (["daemon", "--domain", DOMAIN, "--cron", "minute"], "needs 5 fields: minute hour day month weekday",
     None),
    (["daemon", "--domain", DOMAIN, "--cron", "* * * *"], "needs 5 fields: minute hour day month weekday",
     "* * * *"),
])
async def test_hiding_the_command_lines_values_leaves_the_messages_own_words_whole(
        invoke, argv, kept, hidden):
    # A value is hidden where it stands whole, not inside a longer word of the message; the
    # parser's own vocabulary (a list's name, a crontab field's, a URL scheme) is no secret.
    outcome = await invoke(*argv, env={"MAILGUN_API_KEY": API_KEY})
    assert outcome.code == 2
    [line] = outcome.err.splitlines()
    assert kept in line
    assert hidden is None or hidden not in line


async def test_an_unknown_log_level_is_one_line_exit_2_not_a_traceback(invoke):
    outcome = await invoke("--log-level", "verbose", "status", env={})
    assert (outcome.code, outcome.out) == (2, "")
    [line] = outcome.err.splitlines()
    assert line.startswith("mailgun-sync: ")


async def test_an_ssl_key_password_in_the_query_shows_no_piece_of_itself_when_it_holds_an_ampersand(invoke):
    # As the ?password= case: asyncpg also reads sslpassword= from the query, and what
    # follows an unencoded & in it is sent to the server as a setting's name, which it quotes back.
    password = "Xk9&mZ2q=Pw7"
    outcome = await invoke("status", env={
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/postgres?sslpassword={password}"})
    assert outcome.code in (1, 2)
    shown = sorted(piece for piece in {password[i:i + 3] for i in range(len(password) - 2)}
                   if piece in outcome.out + outcome.err)
    assert not shown, f"pieces of the password {shown} in: {outcome.err!r}"
