"""The Mailgun client the worker uses: whole lists page by page, one record, pushes, deletes, and
the account's domains, each with retries.

The client owns no session: one `aiohttp.ClientSession` per process is opened by the caller and
shared. The API key travels only in the Authorization header of requests built for the configured
origin; paging URLs pointing anywhere else stop the pull instead of being followed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from urllib.parse import quote, quote_plus

import aiohttp
import orjson

from worker import errors
from worker.mailgun.domain_listing import AccountDomain, list_account_domains
from worker.mailgun.paging import ListPull, RangeTrace
from worker.mailgun.retry import RetryPolicy
from worker.mailgun.transport import HttpObserver, Reply, Transport, where
from worker.records import (
    MAX_BATCH,
    MalformedRecordError,
    Page,
    Record,
    SuppressionList,
    batch_item,
    form_fields,
    parse_record,
    single_item,
)

DEFAULT_PAGE_LIMIT = 1000
DEFAULT_MAX_PAGES = 1_000_000
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Rejection:
    record: Record
    reason: str


@dataclass(slots=True)
class PushOutcome:
    """What Mailgun confirmed (a 2xx) and what it refused (with its message)."""

    accepted: list[Record] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    def extend(self, other: PushOutcome) -> None:
        self.accepted.extend(other.accepted)
        self.rejected.extend(other.rejected)


def _chunks(records: Iterable[Record], size: int) -> Iterable[list[Record]]:
    iterator = iter(records)
    while batch := list(islice(iterator, size)):
        yield batch


class MailgunClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_base: str,
        api_key: str,
        retry: RetryPolicy | None = None,
        page_limit: int = DEFAULT_PAGE_LIMIT,
        max_pages: int = DEFAULT_MAX_PAGES,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        push_concurrency: int = 4,
        timeout: float = 30.0,
        api_version: str = "v3",
        observer: HttpObserver | None = None,
    ) -> None:
        self._transport = Transport(
            session, api_base=api_base, api_key=api_key, retry=retry or RetryPolicy(),
            max_response_bytes=max_response_bytes, timeout=timeout, observer=observer)
        self._page_limit = page_limit
        self._max_pages = max_pages
        self._push_concurrency = push_concurrency
        self._version = api_version

    def __repr__(self) -> str:
        return f"MailgunClient(api_base={self.api_base!r})"

    @property
    def api_base(self) -> str:
        return self._transport.base

    def list_url(self, domain: str, kind: SuppressionList) -> str:
        return f"{self.api_base}/{self._version}/{quote(domain, safe='')}/{kind.path}"

    def address_url(self, domain: str, kind: SuppressionList, address: str) -> str:
        # Mailgun decodes path addresses query-style: a raw `+` would arrive as a space.
        return f"{self.list_url(domain, kind)}/{quote(address, safe='')}"

    # ---- reading --------------------------------------------------------------------------

    def pages(
        self, domain: str, kind: SuppressionList, *, after: str | None = None,
        until: str | None = None, ordered: bool = False, term: str = "",
        trace: RangeTrace | None = None, resumed: bool = False,
    ) -> AsyncGenerator[Page, None]:
        """Every page of a list, in order, with every guard of `ListPull.pages`."""
        return self._pull(domain, kind, term).pages(after=after, until=until, ordered=ordered,
                                                    trace=trace, resumed=resumed)

    def ranged_pages(self, domain: str, kind: SuppressionList,
                     pivots: Sequence[str]) -> AsyncGenerator[Page, None]:
        """Every page of a list, read as keyset ranges at once (`ListPull.ranges`)."""
        return self._pull(domain, kind).ranges(pivots)

    async def records(self, domain: str, kind: SuppressionList) -> AsyncIterator[Record]:
        async for page in self.pages(domain, kind):
            for record in page.records:
                yield record

    def _pull(self, domain: str, kind: SuppressionList, term: str = "") -> ListPull:
        return ListPull(self._transport, domain, kind, self.list_url(domain, kind),
                        page_limit=self._page_limit, max_pages=self._max_pages, term=term)

    async def account_domains(self) -> list[AccountDomain]:
        """Every domain of the account in this client's region, read whole or raising."""
        return await list_account_domains(self._transport, max_pages=self._max_pages)

    async def get(self, domain: str, kind: SuppressionList, address: str) -> Record | None:
        """One record, or None when Mailgun does not list the address (its own answer for that,
        not any 404)."""
        url = self.address_url(domain, kind, address)
        reply = await self._transport.request("GET", url, domain, kind)
        if reply.status == 404 and reply.not_listed(kind):
            return None
        if reply.status != 200:
            raise self._transport.error(reply, domain, kind)
        try:
            return parse_record(kind, single_item(kind, orjson.loads(reply.body)))
        except (orjson.JSONDecodeError, MalformedRecordError) as exc:
            raise errors.MalformedPageError(
                f"{where(domain, kind)}: unreadable record for {address!r}: {exc}", url=url) from exc

    # ---- writing --------------------------------------------------------------------------

    async def push(self, domain: str, kind: SuppressionList, records: Iterable[Record],
                   *, batch_size: int = MAX_BATCH) -> AsyncGenerator[PushOutcome, None]:
        """Send records in batches (one each for the allowlist), a bounded number at a time,
        yielding each batch's outcome as soon as Mailgun answered it."""
        size = min(batch_size, MAX_BATCH) if kind.accepts_batches else 1
        running: set[asyncio.Task[PushOutcome]] = set()
        try:
            for batch in _chunks(records, size):
                if len(running) >= self._push_concurrency:
                    done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        yield task.result()
                running.add(asyncio.create_task(self.push_batch(domain, kind, batch)))
            while running:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def push_batch(self, domain: str, kind: SuppressionList,
                         records: Sequence[Record]) -> PushOutcome:
        """Add up to 1000 records. A batch Mailgun refuses (400/413) is split in halves until the
        refused records are found, so one bad record never holds back the others."""
        if not records:
            return PushOutcome()
        if len(records) > MAX_BATCH:
            raise ValueError(f"a batch holds at most {MAX_BATCH} records, not {len(records)}")
        url = self.list_url(domain, kind)
        if kind.accepts_batches:
            body = orjson.dumps([batch_item(kind, r) for r in records])
            reply = await self._transport.request("POST", url, domain, kind, json_body=body)
        else:
            outcome = PushOutcome()
            for record in records:
                form = form_fields(kind, record)
                reply = await self._transport.request("POST", url, domain, kind, form=form)
                outcome.extend(self._one_outcome(reply, [record], domain, kind))
            return outcome
        if reply.status in (400, 413) and len(records) > 1:
            half = len(records) // 2
            outcome = await self.push_batch(domain, kind, records[:half])
            outcome.extend(await self.push_batch(domain, kind, records[half:]))
            return outcome
        return self._one_outcome(reply, records, domain, kind)

    def _one_outcome(self, reply: Reply, records: Sequence[Record], domain: str,
                     kind: SuppressionList) -> PushOutcome:
        if 200 <= reply.status < 300:
            return PushOutcome(accepted=list(records))
        if reply.status in (400, 413):
            return PushOutcome(rejected=[Rejection(r, reply.message()) for r in records])
        raise self._transport.error(reply, domain, kind)

    async def delete(self, domain: str, kind: SuppressionList, address: str,
                     *, tag: str | None = None) -> bool:
        """Remove an address (or one unsubscribe tag). False when Mailgun did not have it.

        Only Mailgun's own "not found in this list" answer means that: a 404 for another reason (a
        domain it does not know, a wrong region) raises, so the removal stays queued. Mailgun's
        texts for a DELETE are recorded for bounces only; any other 404 text is checked with a GET
        of the address, whose texts are documented for every list."""
        url = self.address_url(domain, kind, address)
        if tag is not None:
            url += f"?tag={quote_plus(tag)}"
        reply = await self._transport.request("DELETE", url, domain, kind)
        if 200 <= reply.status < 300:
            return True
        if reply.status == 404 and (reply.not_listed(kind)
                                    or await self._absent(domain, kind, address, tag)):
            return False
        raise self._transport.error(reply, domain, kind)

    async def _absent(self, domain: str, kind: SuppressionList, address: str, tag: str | None) -> bool:
        """Whether Mailgun does not list the address (or, for a tag, the address with that tag)."""
        try:
            record = await self.get(domain, kind, address)
        except errors.MailgunError:
            return False  # the DELETE's own answer is the error to report
        return record is None or (tag is not None and tag not in record.tags)
