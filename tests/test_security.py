"""Security properties: the key stays secret and goes only where it should; SQL is parameterised;
request bodies are bounded."""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.conftest import API_KEY, DOMAIN
from tests.support.cli import BASIC_AUTH
from worker import errors
from worker.emulator import Fault, MailgunEmulator
from worker.metrics import Metrics
from worker.records import SuppressionList
from worker.report import list_status
from worker.sql import queries
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
