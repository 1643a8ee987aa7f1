"""The Mailgun suppressions API as an aiohttp application, with fault injection and a request log.

Wire behaviour follows the API reference: keyset paging URLs in the recorded shape, exact messages,
`text/plain` 401s, JSON bodies ending in a newline, `X-Request-*` budget headers, and path addresses
decoded the way Mailgun does (a raw `+` becomes a space).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import csv
import hashlib
import io
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote_plus

import orjson
from aiohttp import web

from worker.emulator import messages
from worker.emulator.faults import Fault, FaultBook
from worker.emulator.settings import EmulatorSettings
from worker.emulator.synthetic import synthetic_rows
from worker.emulator.tables import BadRecordError, DomainTables, ListTable, WireRecord, build_row
from worker.records import SuppressionList

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CONTROL_PREFIX = "/_emulator"
# Recorded with every 401 (reference §5.2).
UNAUTHORIZED_CHALLENGE = 'Basic realm="MG API"'
_FAULT_KEY = web.RequestKey("fault", Fault)


@dataclass
class RecordedRequest:
    """One request as the emulator saw it; the credentials are reduced to whether they were right."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: bytes
    authorized: bool
    status: int | None = None

    def json(self) -> Any:
        return orjson.loads(self.body)

    def form(self) -> dict[str, str]:
        """The fields of a url-encoded form body (a single add)."""
        return dict(parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["body"] = self.body.decode("utf-8", "replace")
        return out


def _json(status: int, payload: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(payload) + b"\n",
        headers={"Content-Type": "application/json; charset=utf-8", **(headers or {})},
    )


def _message(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json(status, {"message": text}, headers)


def _valid_address(address: str) -> bool:
    local, at, host = address.rpartition("@")
    return (
        bool(at and local and host and "." in host.strip("."))
        and len(address) <= 512
        and not any(c.isspace() or ord(c) < 32 for c in address)
    )


def _valid_domain(domain: str) -> bool:
    return bool(domain) and "." in domain and not any(c.isspace() or c == "@" for c in domain)


class MailgunEmulator:
    """A stand-in for Mailgun's suppression endpoints.

    Use it in-process (`async with MailgunEmulator(...) as emulator:`, or mount `emulator.app` on
    pytest-aiohttp's `aiohttp_server`), or run it with `mailgun-sync emulator`. Tests drive it
    through this object; other processes through the control endpoints under `/_emulator`.
    """

    def __init__(
        self,
        *,
        api_key: str = "key-emulator",
        domains: Iterable[str] = (),
        settings: EmulatorSettings | None = None,
        request_log_size: int = 10_000,
    ) -> None:
        self.api_key = api_key
        self.settings = settings or EmulatorSettings()
        self.tables = DomainTables(case_sensitive=self.settings.case_sensitive)
        self.disabled_domains: set[str] = set()
        # Declared at start (`--domain`): a reset keeps them, or every call would then answer
        # "Domain not found".
        self.startup_domains = tuple(domains)
        for domain in self.startup_domains:
            self.tables.declare(domain)
        self.faults = FaultBook()
        self.requests: collections.deque[RecordedRequest] = collections.deque(
            maxlen=request_log_size)
        self.served: collections.Counter[str] = collections.Counter()  # API requests by method
        self.answered: collections.Counter[int] = collections.Counter()  # and by status answered
        self._budget: dict[str, tuple[float, int]] = {}
        # Requests parked by a `hold` or `hold_after` fault, each with the gate that lets it go on.
        self._holds: list[tuple[RecordedRequest, asyncio.Event]] = []
        self._parked = asyncio.Event()  # set whenever a request is parked
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None
        self.app = self._build_app()

    # ---- Python API -------------------------------------------------------------------------

    def declare(self, domain: str, *, disabled: bool = False) -> None:
        """Create a domain (`GET /v3/domains` lists it; `disabled` as Mailgun shows a disabled one)."""
        self.tables.declare(domain)
        if disabled:
            self.disabled_domains.add(domain)
        else:
            self.disabled_domains.discard(domain)

    def remove_domain(self, domain: str) -> bool:
        """Delete a domain with its lists (`GET /v3/domains` no longer lists it); False if unknown."""
        self.disabled_domains.discard(domain)
        return self.tables.remove(domain)

    def seed(self, domain: str, kind: SuppressionList | str, records: Iterable[dict[str, Any]]) -> None:
        """Store records given in Mailgun's wire form (as a list endpoint returns them)."""
        table = self.tables.table(domain, SuppressionList.parse(str(kind)))
        for record in records:
            table.upsert(dict(record))

    def load_seed(self, data: dict[str, Any]) -> None:
        """`{"domains": {"mg.example.com": {"bounces": [...], "unsubscribes": [...], ...}}}`"""
        for domain, lists in dict(data.get("domains", {})).items():
            self.declare(domain)
            for kind, records in dict(lists).items():
                self.seed(domain, kind, records)

    def generate(self, domain: str, kind: SuppressionList | str, count: int, start: int = 0) -> None:
        """Add `count` synthetic records (see worker.emulator.synthetic) in one go."""
        kind = SuppressionList.parse(str(kind))
        self.tables.table(domain, kind).bulk_load(synthetic_rows(kind, count, start))

    def remove(self, domain: str, kind: SuppressionList | str, address: str) -> bool:
        """Delete one record, as if someone removed it in Mailgun's dashboard."""
        return self.tables.table(domain, SuppressionList.parse(str(kind))).remove(address) is not None

    def records(self, domain: str, kind: SuppressionList | str) -> list[dict[str, Any]]:
        """A copy of a list, in the API's order."""
        table = self.tables.table(domain, SuppressionList.parse(str(kind)))
        return [dict(row) for row in table.rows()]

    def inject(self, fault: Fault) -> Fault:
        self.faults.add(fault)
        return fault

    def fail_next(self, status: int, *, times: int | None = 1, **match: Any) -> Fault:
        """Answer the next `times` matching requests with `status`."""
        return self.inject(Fault(action="status", status=status, times=times, **match))

    @property
    def held(self) -> list[RecordedRequest]:
        """The requests a `hold` or `hold_after` fault is parking right now, oldest first."""
        return [recorded for recorded, _ in self._holds]

    def release(self) -> int:
        """Let every parked request go on; returns how many there were."""
        holds, self._holds = self._holds, []
        for _, gate in holds:
            gate.set()
        return len(holds)

    async def until_held(self, count: int = 1) -> list[RecordedRequest]:
        """Wait until at least `count` requests are parked (bound it with `asyncio.timeout`)."""
        while len(self._holds) < count:
            self._parked.clear()
            await self._parked.wait()
        return self.held

    def reset(self) -> None:
        """Forget every record, fault, logged request and spent budget, and every domain but
        those declared at start (kept, empty); let parked requests go on."""
        self.release()
        self.tables.clear()
        for domain in self.startup_domains:
            self.tables.declare(domain)
        self.disabled_domains.clear()
        self.faults.clear()
        self.requests.clear()
        self.served.clear()
        self.answered.clear()
        self._budget.clear()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on a real socket; returns the base URL (`http://host:port`, `http://[::1]:port`)."""
        # A stop does not wait long for requests held by a delay fault.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        # An IPv6 address is bracketed in a URL (RFC 3986), or its colons read as the port's.
        host = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.base_url = f"http://{host}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MailgunEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- wiring ----------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._pipeline], client_max_size=self.settings.max_request_bytes)
        app.router.add_get("/v3/domains", self._domains_route)
        # Mailgun's JavaScript SDK lists domains with `GET /v4/domains` (`mg.domains.list()`). The
        # reference records only that it answers with `X-Request-Limit: 10`, nothing of its body:
        # it is answered in /v3/domains' shape (`total_count`, `items`, `skip`/`limit`), in the
        # same budget.
        app.router.add_get("/v4/domains", self._domains_route)
        for version in ("v3", "v2"):
            app.router.add_route("*", f"/{version}/{{domain}}/{{list}}", self._list_route)
            app.router.add_post(f"/{version}/{{domain}}/{{list}}/import", self._import)
            app.router.add_route("*", f"/{version}/{{domain}}/{{list}}/{{address:.+}}",
                                 self._address_route)
        control = web.RouteTableDef()
        control.get(f"{CONTROL_PREFIX}/state")(self._control_state)
        control.post(f"{CONTROL_PREFIX}/seed")(self._control_seed)
        control.post(f"{CONTROL_PREFIX}/generate")(self._control_generate)
        control.post(f"{CONTROL_PREFIX}/domains/{{domain}}")(self._control_declare)
        control.delete(f"{CONTROL_PREFIX}/domains/{{domain}}")(self._control_remove_domain)
        control.post(f"{CONTROL_PREFIX}/faults")(self._control_add_fault)
        control.delete(f"{CONTROL_PREFIX}/faults")(self._control_clear_faults)
        control.get(f"{CONTROL_PREFIX}/requests")(self._control_requests)
        control.delete(f"{CONTROL_PREFIX}/requests")(self._control_clear_requests)
        control.patch(f"{CONTROL_PREFIX}/settings")(self._control_settings)
        control.post(f"{CONTROL_PREFIX}/reset")(self._control_reset)
        control.post(f"{CONTROL_PREFIX}/release")(self._control_release)
        control.get(f"{CONTROL_PREFIX}/records/{{domain}}/{{list}}")(self._control_records)
        app.add_routes(control)
        return app

    @web.middleware
    async def _pipeline(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await handler(request)
        # A multipart body can be read once only, and the handler needs it: log it as empty.
        body = b"" if request.content_type.startswith("multipart/") else await request.read()
        recorded = RecordedRequest(
            method=request.method, path=request.rel_url.raw_path, query=dict(request.query),
            content_type=request.content_type, body=body, authorized=self._authorized(request))
        self.requests.append(recorded)
        self.served[request.method] += 1
        if self.settings.latency_s:
            await asyncio.sleep(self.settings.latency_s)
        response = await self._answer(request, handler, recorded)
        recorded.status = response.status
        self.answered[response.status] += 1
        return response

    async def _answer(self, request: web.Request, handler: Handler,
                      recorded: RecordedRequest) -> web.StreamResponse:
        match = request.match_info
        fault = self.faults.take(request.method, request.path, match.get("domain"),
                                 match.get("list"), request.query.get("page"), recorded.body)
        if fault is not None:
            early = await self._fault_before(request, fault, recorded)
            if early is not None:
                return early
        if not recorded.authorized:
            return web.Response(status=401, text=messages.FORBIDDEN, content_type="text/plain",
                                charset="utf-8", headers={"Www-Authenticate": UNAUTHORIZED_CHALLENGE})
        budget = self._spend_budget(domains=request.path in ("/v3/domains", "/v4/domains"))
        if int(budget["X-Request-Remaining"]) < 0:
            budget["X-Request-Remaining"] = "0"
            if self.settings.retry_after_on_429:
                reset_ms = int(budget["X-Request-Reset"])
                budget["Retry-After"] = str(max(1, int(reset_ms / 1000 - time.time()) + 1))
            return _message(429, messages.RATE_LIMITED, budget)
        domain = match.get("domain", "")
        if "domain" in match and not self.tables.has(domain):
            if not self.settings.auto_create_domains:
                return _message(404, messages.domain_not_found(domain), budget)
            self.tables.declare(domain)
        if fault is not None:
            request[_FAULT_KEY] = fault
        try:
            response = await handler(request)
        except _Refusal as refusal:
            response = _message(refusal.status, refusal.message)
        response.headers.update(budget)
        if fault is not None and isinstance(response, web.Response):
            return await self._fault_after(request, response, fault, recorded)
        return response

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, key = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return user == "api" and key == self.api_key

    def _spend_budget(self, *, domains: bool = False) -> dict[str, str]:
        """A fixed window per key: the count resets when the window turns. The domain listing
        counts in a budget of its own."""
        settings = self.settings
        window = settings.domains_rate_window_s if domains else settings.rate_window_s
        limit = settings.domains_rate_limit if domains else settings.rate_limit
        bucket = f"{self.api_key}/domains" if domains else self.api_key
        now = time.time()
        start = now - now % window
        last_start, used = self._budget.get(bucket, (start, 0))
        used = used + 1 if last_start == start else 1
        self._budget[bucket] = (start, used)
        return {
            "X-Request-Limit": str(limit),
            "X-Request-Remaining": str(limit - used),
            "X-Request-Reset": str(int((start + window) * 1000)),
        }

    # ---- faults ----------------------------------------------------------------------------

    async def _hold(self, recorded: RecordedRequest) -> None:
        gate = asyncio.Event()
        self._holds.append((recorded, gate))
        self._parked.set()
        await gate.wait()

    async def _fault_before(self, request: web.Request, fault: Fault,
                            recorded: RecordedRequest) -> web.StreamResponse | None:
        if fault.action == "hold":
            await self._hold(recorded)
            if request.transport is None or request.transport.is_closing():
                # The client gave up while the request was parked: Mailgun never saw it.
                return web.Response(status=499)
            return None
        if fault.action == "delay":
            await asyncio.sleep(fault.delay_s)
            return None
        if fault.action == "drop":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never delivered: the connection is gone
        if fault.action != "status":
            return None
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = fault.retry_after
        if fault.reset_in_ms is not None:
            headers["X-Request-Limit"] = str(self.settings.rate_limit)
            headers["X-Request-Remaining"] = "0"
            headers["X-Request-Reset"] = str(int(time.time() * 1000) + fault.reset_in_ms)
        if fault.status == 401:
            headers["Www-Authenticate"] = UNAUTHORIZED_CHALLENGE
            return web.Response(status=401, text=messages.FORBIDDEN, content_type="text/plain",
                                charset="utf-8", headers=headers)
        text = fault.message or (messages.RATE_LIMITED if fault.status == 429 else messages.INTERNAL)
        return _message(fault.status, text, headers)

    async def _fault_after(self, request: web.Request, response: web.Response,
                           fault: Fault, recorded: RecordedRequest) -> web.StreamResponse:
        body = response.body if isinstance(response.body, bytes) else b""
        if fault.action == "hold_after":
            await self._hold(recorded)
        elif fault.action == "delay_after":
            await asyncio.sleep(fault.delay_s)
        elif fault.action == "malformed_json":
            response.body = b"<html><body>502 Bad Gateway</body></html>\n"
        elif fault.action == "invalid_utf8":
            response.body = body.replace(b"@", b"\xff@", 1)
        elif fault.action == "truncated_json":
            response.body = body[: max(1, len(body) // 2)]
        elif fault.action in ("reset", "slow_body"):
            stream = web.StreamResponse(status=response.status, headers=response.headers)
            stream.content_length = len(body)
            await stream.prepare(request)
            if fault.action == "reset":
                await stream.write(body[: len(body) // 2])
                if request.transport is not None:
                    request.transport.abort()
                return stream  # the rest is never delivered: the connection is gone
            for start in range(0, len(body), 256):
                await stream.write(body[start:start + 256])
                await asyncio.sleep(fault.delay_s)
            await stream.write_eof()
            return stream
        return response

    # ---- the API ---------------------------------------------------------------------------

    def _kind(self, request: web.Request) -> SuppressionList:
        try:
            return SuppressionList.from_path(request.match_info["list"])
        except ValueError:
            raise _Refusal(404, "Not Found") from None

    def _table(self, request: web.Request) -> ListTable:
        return self.tables.table(request.match_info["domain"], self._kind(request))

    async def _list_route(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            return await self._list(request)
        if request.method == "POST":
            return await self._add(request)
        if request.method == "DELETE":
            table = self._table(request)
            table.clear()
            return _message(200, messages.REMOVED_ALL[table.kind])
        raise _Refusal(405, "Method Not Allowed")

    def _limit(self, request: web.Request) -> int:
        raw = request.query.get("limit", "100")
        try:
            limit = int(raw)
        except ValueError:
            raise _bad_request(messages.invalid_format("limit", raw)) from None
        if limit < 1:
            raise _bad_request(messages.invalid_parameter("limit", raw))
        if limit > self.settings.max_limit:
            if self.settings.over_limit == "reject":
                raise _bad_request(messages.invalid_parameter("limit", raw))
            limit = self.settings.max_limit
        return limit

    async def _list(self, request: web.Request) -> web.Response:
        table = self._table(request)
        limit = self._limit(request)
        legacy = request.path.startswith("/v2/") or self.settings.paging_style == "offset"
        if legacy:
            cap = self.settings.legacy_unsubscribes_max_limit \
                if table.kind is SuppressionList.UNSUBSCRIBES else self.settings.legacy_max_limit
            return self._offset_page(request, table, min(limit, cap))
        term = request.query.get("term", "")
        page = request.query.get("page", "")
        pivot = request.query.get("address")
        if page in ("next", "previous") and pivot is None:
            raise _bad_request(messages.missing("address"))
        fault = request.get(_FAULT_KEY)
        if page == "":
            rows = table.after(None, term, limit)
        elif page == "next" and fault is not None and fault.action == "overlap":
            rows = [r for r in [table.get(pivot or "")] if r is not None]
            rows += table.after(pivot, term, limit - len(rows))
        elif page == "next":
            rows = table.after(pivot, term, limit)
        elif page == "previous":
            rows = table.before(pivot, term, limit)
        elif page == "last":
            rows = table.before(None, term, limit)
        else:
            raise _bad_request(messages.invalid_parameter("page", page))

        key = table.kind.address_field
        origin = f"{request.scheme}://{request.host}"
        base = f"{origin}/v3/{quote(request.match_info['domain'], safe='')}/{table.kind.path}"
        tail = f"limit={limit}&term={quote_plus(term)}"
        first = f"{base}?{tail}"
        if rows:
            paging = {
                "first": first,
                "last": f"{base}?page=last&{tail}",
                "next": f"{base}?page=next&address={quote_plus(rows[-1][key])}&{tail}",
                "previous": f"{base}?page=previous&address={quote_plus(rows[0][key])}&{tail}",
            }
        else:
            paging = dict.fromkeys(("first", "last", "next", "previous"), first)
        items: list[WireRecord] | None = rows
        if not rows and page == "next" and self.settings.past_end_items == "null":
            items = None

        if fault is not None:
            if fault.action == "items_null":
                items = None
            elif fault.action == "foreign_next":
                paging["next"] = paging["next"].replace(origin, fault.foreign_origin, 1)
            elif fault.action == "repeat_next":
                paging["next"] = str(request.url)
            elif fault.action == "backwards_next" and rows:
                paging["next"] = f"{base}?page=next&address={quote_plus(rows[0][key])}&{tail}"
            elif fault.action == "oversized":
                body = orjson.dumps({"items": items, "paging": paging})
                return web.Response(
                    body=body[:-1] + b" " * max(0, fault.size_bytes - len(body)) + b"}\n",
                    headers={"Content-Type": "application/json; charset=utf-8"})
        return _json(200, {"items": items, "paging": paging})

    def _offset_page(self, request: web.Request, table: ListTable, limit: int) -> web.Response:
        """The pre-2015 form: `{"total_count", "items"}` with `skip`/`limit`, in v2 record shapes."""
        raw_skip = request.query.get("skip", "0")
        try:
            skip = max(0, int(raw_skip))
        except ValueError:
            raise _bad_request(messages.invalid_format("skip", raw_skip)) from None
        if table.kind is SuppressionList.UNSUBSCRIBES:
            # One row per tag: the offsets count those rows, so the list is expanded once.
            expanded = list(_legacy_rows(table.kind, table.iter_rows()))
            items, total = expanded[skip:skip + limit], len(expanded)
        else:
            items, total = list(_legacy_rows(table.kind, table.slice(skip, limit))), len(table)
        fault = request.get(_FAULT_KEY)
        if fault is not None and fault.action == "items_null":
            return _json(200, {"total_count": total, "items": None})
        return _json(200, {"total_count": total, "items": items})

    async def _add(self, request: web.Request) -> web.Response:
        table = self._table(request)
        kind = table.kind
        if request.content_type == "application/json":
            try:
                batch = orjson.loads(await request.read())
            except orjson.JSONDecodeError as exc:
                return _message(400, f"Invalid json: {exc}")
            if not kind.accepts_batches or not isinstance(batch, list):
                return _message(400, messages.missing("address"))
            if len(batch) > self.settings.max_batch:
                return _message(400, messages.invalid_parameter(
                    "batch", f"of {len(batch)} records exceeds the maximum of {self.settings.max_batch}"))
            for item in batch:
                problem = self._problem(kind, item)
                if problem:
                    return _message(400, problem)
            for item in batch:
                table.upsert(item)
            return _message(200, messages.ADDED_MANY[kind].format(n=len(batch)))

        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        # A form add takes the singular `tag`; Mailgun ignores a plural `tags` there (recorded).
        form.pop("tags", None)
        problem = self._problem(kind, form)
        if problem:
            return _message(400, problem)
        row = table.upsert(form)
        text = messages.ADDED_ONE[kind]
        if kind is SuppressionList.BOUNCES:
            return _json(200, {"message": text, "address": row["address"]})
        if kind is SuppressionList.ALLOWLIST:
            return _json(200, {"message": text, "type": row["type"], "value": row["value"]})
        return _json(200, {"address": row["address"], "message": text})

    def _problem(self, kind: SuppressionList, item: object) -> str | None:
        """Why an add cannot be stored, in Mailgun's words; None when it can."""
        if not isinstance(item, dict):
            return messages.invalid_format("address", item)
        valid: Callable[[str], bool] = _valid_address
        if kind is SuppressionList.ALLOWLIST:
            if item.get("address"):
                value = item["address"]
            elif item.get("domain"):
                value, valid = item["domain"], _valid_domain
            else:
                return messages.missing("address")
        else:
            if "address" not in item:
                return messages.missing("address")
            value = item["address"]
        if not isinstance(value, str):
            return messages.invalid_format("address", value)
        if self.settings.invalid_address == "reject" and not valid(value):
            return messages.invalid_format("address", value)
        try:
            build_row(kind, item)
        except BadRecordError as exc:
            return str(exc)
        return None

    async def _domains_route(self, request: web.Request) -> web.Response:
        """The account's domains, by offset (`skip`, `limit` up to 1000) with `total_count`."""
        try:
            skip = int(request.query.get("skip", "0"))
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return _message(400, "Invalid parameter: skip and limit must be integers")
        if skip < 0 or limit < 1:
            return _message(400, "Invalid parameter: skip and limit must be positive")
        names = self.tables.domains()
        items = [messages.domain_item(name, disabled=name in self.disabled_domains)
                 for name in names[skip:skip + min(limit, 1000)]]
        return _json(200, {"total_count": len(names), "items": items})

    def _path_address(self, request: web.Request) -> str:
        """The address path segment, decoded as Mailgun does: query-style, so `+` is a space."""
        raw = request.rel_url.raw_path.split("/", 4)[4]
        return unquote_plus(raw)

    async def _address_route(self, request: web.Request) -> web.StreamResponse:
        table = self._table(request)
        address = self._path_address(request)
        if request.method == "GET":
            row = table.get(address)
            if row is None:
                return _message(404, messages.NOT_FOUND[table.kind])
            if request.path.startswith("/v2/"):
                return _json(200, _legacy_single(table.kind, row))
            return _json(200, row)
        if request.method != "DELETE":
            raise _Refusal(405, "Method Not Allowed")
        tag = request.query.get("tag")
        if table.kind is SuppressionList.UNSUBSCRIBES and tag:
            row = table.remove_tag(address, tag)
        else:
            row = table.remove(address)
        if row is None:
            return _message(404, messages.NOT_FOUND[table.kind])
        text = messages.REMOVED_ONE[table.kind]
        if table.kind is SuppressionList.ALLOWLIST:
            return _json(200, {"message": text, "value": row["value"]})
        return _json(200, {"address": row["address"], "message": text})

    async def _import(self, request: web.Request) -> web.Response:
        table = self._table(request)
        form = await request.post()
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            return _message(400, messages.missing("file"))
        text = upload.file.read().decode("utf-8-sig", "replace")
        for row in csv.DictReader(io.StringIO(text)):
            item: dict[str, Any] = {k: v for k, v in row.items() if k and v}
            if "tags" in item:
                item["tags"] = [t.strip() for t in str(item["tags"]).split(",") if t.strip()]
            if self._problem(table.kind, item) is None:
                table.upsert(item)
        return _message(self.settings.import_status, messages.IMPORTED)

    # ---- control endpoints -----------------------------------------------------------------

    async def _control_state(self, request: web.Request) -> web.Response:
        counts = {d: {k.value: len(self.tables.table(d, k)) for k in SuppressionList}
                  for d in self.tables.domains()}
        return _json(200, {"domains": counts, "settings": asdict(self.settings),
                           "faults": [asdict(f) for f in self.faults.pending()],
                           "held": len(self._holds),
                           "served": dict(self.served),
                           "answered": {str(status): n for status, n in sorted(self.answered.items())}})

    async def _control_seed(self, request: web.Request) -> web.Response:
        try:
            self.load_seed(orjson.loads(await request.read()))
        except (orjson.JSONDecodeError, BadRecordError, ValueError, TypeError, AttributeError) as exc:
            return _message(400, f"bad seed: {exc}")
        return _message(200, "seeded")

    async def _control_generate(self, request: web.Request) -> web.Response:
        """`{"domain": D, "list": "bounces", "count": N, "start": 0}`"""
        try:
            spec = orjson.loads(await request.read())
            self.declare(spec["domain"])
            self.generate(spec["domain"], spec["list"], int(spec["count"]), int(spec.get("start", 0)))
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
            return _message(400, f"bad generate request: {exc}")
        return _message(200, "generated")

    async def _control_declare(self, request: web.Request) -> web.Response:
        self.declare(request.match_info["domain"])
        return _message(200, "declared")

    async def _control_remove_domain(self, request: web.Request) -> web.Response:
        if not self.remove_domain(request.match_info["domain"]):
            return _message(404, f"Domain not found: {request.match_info['domain']}")
        return _message(200, "removed")

    async def _control_add_fault(self, request: web.Request) -> web.Response:
        try:
            fault = Fault.from_json(orjson.loads(await request.read()))
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            return _message(400, f"bad fault: {exc}")
        self.inject(fault)
        return _json(200, asdict(fault))

    async def _control_clear_faults(self, request: web.Request) -> web.Response:
        self.faults.clear()
        return _message(200, "faults cleared")

    async def _control_requests(self, request: web.Request) -> web.Response:
        return _json(200, [r.as_dict() for r in self.requests])

    async def _control_clear_requests(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return _message(200, "request log cleared")

    async def _control_settings(self, request: web.Request) -> web.Response:
        try:
            self.settings.update(orjson.loads(await request.read()))
        except (orjson.JSONDecodeError, ValueError) as exc:
            return _message(400, f"bad settings: {exc}")
        return _json(200, asdict(self.settings))

    async def _control_release(self, request: web.Request) -> web.Response:
        return _json(200, {"released": self.release()})

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _message(200, "reset")

    async def _control_records(self, request: web.Request) -> web.Response:
        try:
            kind = SuppressionList.parse(request.match_info["list"])
        except ValueError:
            return _message(404, "Not Found")
        return _json(200, self.records(request.match_info["domain"], kind))


class _Refusal(Exception):
    """Raised deep in a handler to answer `{"message": ...}` with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad_request(text: str) -> _Refusal:
    return _Refusal(400, text)


def _legacy_single(kind: SuppressionList, row: WireRecord) -> dict[str, Any]:
    """One record as the v2 API answered a single GET (reference §2.5): a bounce or a complaint
    wrapped in its kind's name, an unsubscribe as a list of its rows (one per tag)."""
    rows = list(_legacy_rows(kind, [row]))
    if kind is SuppressionList.BOUNCES:
        return {"bounce": rows[0]}
    if kind is SuppressionList.COMPLAINTS:
        return {"complaint": rows[0]}
    if kind is SuppressionList.UNSUBSCRIBES:
        return {"total_count": len(rows), "items": rows}
    return rows[0]


def _legacy_rows(kind: SuppressionList, rows: Iterable[WireRecord]) -> Iterator[WireRecord]:
    """Records as the v2 API listed them: numeric codes as numbers, one unsubscribe row per tag
    (with an `id`), complaints with a `count`."""
    for row in rows:
        if kind is SuppressionList.BOUNCES:
            code = row["code"]
            yield {**row, "code": int(code) if code.isdigit() else code}
        elif kind is SuppressionList.UNSUBSCRIBES:
            for tag in row["tags"]:
                # An id in Mailgun's form, stable per (address, tag): a label, not a secret.
                key = f"{row['address']}\0{tag}".encode()
                ident = hashlib.sha1(key, usedforsecurity=False).hexdigest()[:24]
                yield {"created_at": row["created_at"], "tag": tag, "id": ident,
                       "address": row["address"]}
        elif kind is SuppressionList.COMPLAINTS:
            yield {"count": 1, **row}
        else:
            yield row
