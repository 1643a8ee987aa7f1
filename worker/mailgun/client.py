"""The Mailgun client: reads whole lists page by page, pushes records back, deletes, with retries.

The client owns no session: one `aiohttp.ClientSession` per process is opened by the caller and
shared. The API key travels only in the Authorization header of requests built for the configured
origin; paging URLs pointing anywhere else stop the pull instead of being followed.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import aiohttp
import orjson

from worker import errors
from worker.logs import get_logger
from worker.mailgun.domain_listing import AccountDomain, list_account_domains
from worker.mailgun.retry import RetryPolicy
from worker.mailgun.transport import DEFAULT_MAX_RESPONSE_BYTES, HttpObserver, Reply, Transport
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
    staging_rows,
)

log = get_logger(__name__)

DEFAULT_PAGE_LIMIT = 1000
DEFAULT_MAX_PAGES = 1_000_000
# The longest URL sent: most servers refuse a request line over 8 KB, and a cursor is an address,
# which Mailgun may hold at any length (one of 10,000 characters has been seen).
MAX_URL = 4096


@dataclass(slots=True)
class RangeTrace:
    """Where one keyset range started and where it stopped, to check ranges meet end to end."""

    first: str | None = None    # the first record Mailgun gave the range (None: none at all)
    beyond: str | None = None   # the first record it saw past its upper bound (None: list ended)


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
        self._transport = Transport(session, api_base=api_base, api_key=api_key, retry=retry,
                                    max_response_bytes=max_response_bytes, timeout=timeout,
                                    observer=observer)
        self._base = self._transport.base
        self._origin = self._transport.origin
        self._page_limit = page_limit
        self._max_pages = max_pages
        self._push_concurrency = push_concurrency
        self._version = api_version

    def __repr__(self) -> str:
        return f"MailgunClient(api_base={self._base!r})"

    @property
    def api_base(self) -> str:
        return self._base

    def list_url(self, domain: str, kind: SuppressionList) -> str:
        return f"{self._base}/{self._version}/{quote(domain, safe='')}/{kind.path}"

    def address_url(self, domain: str, kind: SuppressionList, address: str) -> str:
        # Mailgun decodes path addresses query-style: a raw `+` would arrive as a space.
        return f"{self.list_url(domain, kind)}/{quote(address, safe='')}"

    # ---- reading --------------------------------------------------------------------------

    async def pages(
        self, domain: str, kind: SuppressionList, *, after: str | None = None,
        until: str | None = None, ordered: bool = False, term: str = "",
        trace: RangeTrace | None = None, resumed: bool = False,
    ) -> AsyncGenerator[Page, None]:
        """Every page of a list, in order, following `paging.next` as Mailgun returns it.

        Ending normally means the list was read to its end (an empty, null or missing `items`), or,
        with `until`, past that address. Anything else raises: a PagingError for a page that cannot
        be trusted, a MailgunError for a request that failed. `after` starts behind that address
        (keyset resume); `resumed` says an earlier pull read the list up to `after`, so an empty
        last page cannot vouch for it either. With `until`, the range (after, until] is read. With
        `ordered` (implied by `until`), records must come in strictly increasing code-point order,
        else PagingOrderError.
        """
        ordered = ordered or until is not None
        base = self.list_url(domain, kind)
        tail = f"limit={self._page_limit}&term={quote_plus(term)}"
        url, reread = self._resume_url(base, tail, after) if after is not None else (f"{base}?{tail}", None)
        fetched: set[str] = set()
        number = 0
        previous = after  # the bound the next record must exceed, for the order check
        last_read = after if resumed else None
        # The next page is requested as soon as its URL is known and checked, so Mailgun's answer
        # travels while this page is normalised and stored.
        upcoming: asyncio.Future[dict[str, Any]] | None = asyncio.ensure_future(
            self._transport.get_json(url, domain, kind))
        try:
            while upcoming is not None:
                payload = await upcoming
                upcoming = None
                if "paging" not in payload and "total_count" in payload:
                    if ordered:
                        raise errors.PagingOrderError(
                            f"{domain} {kind.value}: the legacy offset form cannot be read in ranges",
                            url=url)
                    async for page in self._offset_pages(payload, base, domain, kind):
                        yield page
                    return
                items = payload.get("items")
                if items is None or items == []:
                    await self._confirm_end(base, tail, last_read, after, domain, kind)
                    return
                if not isinstance(items, list):
                    raise errors.MalformedPageError(
                        f"{domain} {kind.value}: `items` is {type(items).__name__}, expected a list",
                        url=url)
                fetched.add(url)
                next_url, last = self._next_url(payload, url, fetched, items[-1], domain, kind, base)
                if reread is not None:
                    items = self._past(items, reread, kind)
                    if not items:  # nothing but records read before: where does the list end?
                        await self._confirm_end(base, tail, reread, after, domain, kind)
                        return
                    reread = None
                if len(next_url) > MAX_URL:
                    next_url, reread = self._resume_url(base, tail, last)
                    if next_url in fetched:
                        raise errors.PagingError(
                            f"{domain} {kind.value}: records whose addresses are too long for a URL "
                            f"begin alike ({last[:80]!r}...); paging cannot get past them", url=url)
                beyond = until is not None and last > until
                if not beyond and number + 1 < self._max_pages:
                    upcoming = asyncio.ensure_future(self._transport.get_json(next_url, domain, kind))
                number += 1
                page = self._page(number, url, kind, items, domain)
                if trace is not None and number == 1:
                    trace.first = page.items[0][kind.address_field]
                if ordered:
                    page, past = self._within(page, previous, until, domain)
                    if trace is not None and past is not None:
                        trace.beyond = past
                previous = last_read = last
                if beyond:
                    if page.rows:
                        yield page
                    return
                yield page
                url = next_url
            raise errors.PagingError(
                f"{domain} {kind.value}: stopped after {self._max_pages} pages without "
                "reaching the end of the list", url=url)
        finally:
            if upcoming is not None:
                upcoming.cancel()
                await asyncio.gather(upcoming, return_exceptions=True)

    @staticmethod
    def _resume_url(base: str, tail: str, address: str) -> tuple[str, str | None]:
        """The URL of the records after `address`, and None. When that URL is too long, the URL
        after the longest prefix of the address that fits, and the address: the records from the
        prefix up to the address (all starting with the prefix, so too long to hold as well) come
        again, and are dropped by `_past`."""
        url = f"{base}?page=next&address={quote_plus(address)}&{tail}"
        if len(url) <= MAX_URL:
            return url, None
        room = MAX_URL - len(url) + len(quote_plus(address))
        end = size = 0
        while size + len(quote_plus(address[end])) <= room:
            size += len(quote_plus(address[end]))
            end += 1
        return f"{base}?page=next&address={quote_plus(address[:end])}&{tail}", address

    @staticmethod
    def _past(items: list[Any], read: str, kind: SuppressionList) -> list[Any]:
        """The items after the records read again from a shortened cursor: the leading ones up to
        `read` (up to it in code-point and in case-blind order, the orders Mailgun may keep)."""
        key = kind.address_field
        start = 0
        for item in items:
            address = item.get(key) if isinstance(item, dict) else None
            if not isinstance(address, str) or address > read or address.lower() > read.lower():
                break
            start += 1
            if address == read:
                break
        return items[start:]

    async def _confirm_end(self, base: str, tail: str, last: str | None, after: str | None,
                           domain: str, kind: SuppressionList) -> None:
        """An empty page ends the list only if Mailgun's own last page agrees: a page cut short or
        emptied by mistake must not read as the end, or removals would follow.

        A complete pull ends on Mailgun's very last record, or beyond it if the tail changed
        meanwhile; "beyond" must hold both in code-point and in case-blind order, the two orders
        Mailgun may keep. A pager that read nothing after `after` is right only if nothing lies
        beyond `after`. A pager that read records is never vouched for by an empty last page: that
        is two answers disagreeing (say `items: null` mid-list and again at the end).
        """
        url = f"{base}?page=last&{tail}"
        payload = await self._transport.get_json(url, domain, kind)
        items = payload.get("items")
        final = None
        if isinstance(items, list) and items and isinstance(items[-1], dict):
            final = items[-1].get(kind.address_field)
        bound = last if last is not None else after
        if final is None:
            if last is None:
                return  # this pager read nothing, and by both accounts nothing lies at the end
            if items:
                raise errors.MalformedPageError(f"{domain} {kind.value}: the last page is unreadable",
                                                url=url)
            # Records were read, yet the last page is empty: the two answers disagree, and only a
            # last page that shows where the list ends may vouch for a pull.
            raise errors.PagingError(
                f"{domain} {kind.value}: records were read up to {last!r}, but the list's last page "
                "is empty; the pull is incomplete", url=url)
        complete = bound is not None and isinstance(final, str) and final <= bound \
            and final.lower() <= bound.lower()
        if not complete:
            raise errors.PagingError(
                f"{domain} {kind.value}: the list ended after {last or after or 'nothing'!r}, but "
                f"its last page ends with {final!r}; the pull is incomplete", url=url)

    @staticmethod
    def _within(page: Page, previous: str | None, until: str | None,
                domain: str) -> tuple[Page, str | None]:
        """The page's records up to `until` (all without one), after checking they increase
        strictly (skipped ones too); and the first record past `until`, if any."""
        addresses = [item[page.kind.address_field] for item in page.items]
        for address in addresses:
            if previous is not None and not address > previous:
                raise errors.PagingOrderError(
                    f"{domain} {page.kind.value}: {address[:200]!r} came after {previous[:200]!r}; "
                    "the records are not in code-point order", url=page.url)
            previous = address
        keep = len(addresses) if until is None else bisect.bisect_right(addresses, until)
        if keep == len(addresses):
            return page, None
        assert until is not None
        rows = page.rows[:bisect.bisect_right([row[1] for row in page.rows], until)]
        skipped = [s for s in page.skipped if s.address <= until]
        return (Page(page.number, page.url, page.kind, page.items[:keep], rows, skipped),
                addresses[keep])

    async def ranged_pages(self, domain: str, kind: SuppressionList,
                           pivots: Sequence[str]) -> AsyncGenerator[Page, None]:
        """Every page of a list, read as len(pivots) + 1 keyset ranges at once, in no particular
        order: (-inf, p1], (p1, p2], ..., (pn, +inf). Each range is its own pager with every guard
        of `pages`; any error stops them all. Completeness rests on code-point order, which each
        range checks (PagingOrderError otherwise)."""
        bounds = sorted(set(pivots))
        ranges = list(zip([None, *bounds], [*bounds, None], strict=True))
        traces = [RangeTrace() for _ in ranges]
        # A short queue: storing is fast, and every page waiting here is memory (readers blocked
        # on a full queue hold one page each as well).
        queue: asyncio.Queue[Page | None] = asyncio.Queue(maxsize=4)
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def read(after: str | None, until: str | None, trace: RangeTrace) -> None:
            try:
                async for page in self.pages(domain, kind, after=after, until=until, ordered=True,
                                             trace=trace):
                    await queue.put(page)
                await queue.put(None)
            except Exception as exc:  # raised by the consumer; a full queue must not block it
                if not failed.done():
                    failed.set_exception(exc)

        readers = [asyncio.ensure_future(read(after, until, trace))
                   for (after, until), trace in zip(ranges, traces, strict=True)]
        try:
            open_ranges = len(readers)
            while open_ranges:
                getting = asyncio.ensure_future(queue.get())
                waiting: list[asyncio.Future[Any]] = [getting, failed]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if failed.done():
                    getting.cancel()
                    failed.result()
                item = await getting
                if item is None:
                    open_ranges -= 1
                else:
                    yield item
            self._check_ranges_meet(traces, domain, kind)
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            if failed.done() and not failed.cancelled():
                failed.exception()  # retrieved, so it is not reported as never retrieved

    @staticmethod
    def _check_ranges_meet(traces: Sequence[RangeTrace], domain: str, kind: SuppressionList) -> None:
        """Each range must hand over to the next exactly where Mailgun's order continues: the
        first record past a range's bound is the first record of the next range. Otherwise the
        order is not code-point order around a pivot (or the list changed right there), records
        may have fallen between, and the caller reads the list with one pager instead."""
        for current, following in itertools.pairwise(traces):
            # A range that reached the end of the list (confirmed by Mailgun's last page) hands
            # over nothing; records the next range read may have been deleted meanwhile.
            if current.beyond is not None and current.beyond != following.first:
                raise errors.PagingOrderError(
                    f"{domain} {kind.value}: a range stopped at {current.beyond!r} but the next began "
                    f"at {following.first!r}; the records are not in code-point order")

    async def records(self, domain: str, kind: SuppressionList) -> AsyncIterator[Record]:
        async for page in self.pages(domain, kind):
            for record in page.records:
                yield record

    async def _offset_pages(self, first: dict[str, Any], base: str, domain: str,
                            kind: SuppressionList) -> AsyncIterator[Page]:
        """The legacy form: `{"total_count", "items"}` walked with `skip`.

        Offsets move when records before them come or go mid-pull: a deletion would slide an
        unread record below the offset, never to be read, and the pull would look complete. So
        every page after the first is asked from one record back and must hold the last record
        already read: what follows it is contiguous with what was read. Records added before
        that record come before it on the page and are left out (a keyset pull does not see
        them either). A page without it raises ListShiftedError: the list is read again.
        """
        payload, url, offset, number = first, f"{base}?limit={self._page_limit}", 0, 0
        anchor: object = None  # the last item read, which the next page must hold
        for _ in range(self._max_pages):
            items, total = payload.get("items"), payload.get("total_count")
            if items is None:
                items = []
            if not isinstance(items, list) or isinstance(total, bool) or not isinstance(total, int):
                raise errors.MalformedPageError(
                    f"{domain} {kind.value}: a legacy page needs a number `total_count` and a list "
                    "of `items`", url=url)
            before, offset = offset, max(offset - 1, 0) + len(items)
            if not items and before < total:
                raise errors.PagingError(
                    f"{domain} {kind.value}: the list ended after {before} of its {total} records; "
                    "the pull is incomplete", url=url)
            if anchor is not None:
                if anchor not in items:
                    raise errors.ListShiftedError(
                        f"{domain} {kind.value}: the list changed during the pull (the page no longer "
                        "holds the last record read); a record may have slid past the offset", url=url)
                items = items[items.index(anchor) + 1:]
            if items:
                number += 1
                yield self._page(number, url, kind, items, domain)
                anchor = items[-1]
            elif offset < total and offset <= before:  # nothing new, yet the count says more
                raise errors.PagingError(
                    f"{domain} {kind.value}: the list ended after {offset} of its {total} records; "
                    "the pull is incomplete", url=url)
            if offset >= total:
                return
            url = f"{base}?skip={offset - 1}&limit={self._page_limit}"
            payload = await self._transport.get_json(url, domain, kind)
        raise errors.PagingError(f"{domain} {kind.value}: stopped after {self._max_pages} pages", url=url)

    def _page(self, number: int, url: str, kind: SuppressionList, items: list[Any],
              domain: str) -> Page:
        try:
            rows, skipped = staging_rows(kind, items)
        except MalformedRecordError as exc:
            raise errors.MalformedPageError(
                f"{domain} {kind.value}: a record on the page is malformed: {exc}", url=url) from exc
        if skipped:
            # Mailgun has these records; the mirror cannot hold them. Said once a page, not a record.
            log.warning("records_skipped", domain=domain, list=kind.value, count=len(skipped), url=url,
                        examples=[f"{s.address[:80]!r}: {s.reason}" for s in skipped[:5]])
        return Page(number, url, kind, items, rows, skipped)

    def _next_url(self, payload: dict[str, Any], url: str, fetched: set[str], last: object,
                  domain: str, kind: SuppressionList, base: str) -> tuple[str, str]:
        """Check `paging.next` before the key is sent anywhere with it; `last` is the page's last
        item, whose address the cursor must continue after. Returns the URL and that address."""
        paging = payload.get("paging")
        nxt = paging.get("next") if isinstance(paging, dict) else None
        where = f"{domain} {kind.value}"
        if not isinstance(nxt, str) or not nxt:
            raise errors.MalformedPageError(
                f"{where}: a page with records has no paging.next, so the list cannot be "
                "read to its end", url=url)
        parts = urlsplit(nxt)
        if (parts.scheme, parts.netloc) != (self._origin.scheme, self._origin.netloc):
            raise errors.PagingError(
                f"{where}: paging.next points at {parts.scheme}://{parts.netloc}, not "
                f"{self._base}; not following it (the API key is only sent to {self._base})",
                url=url)
        if f"{parts.scheme}://{parts.netloc}{parts.path}" != base:
            raise errors.PagingError(
                f"{where}: paging.next points at another path ({parts.path})", url=url)
        if nxt in fetched:
            raise errors.PagingError(
                f"{where}: paging.next repeats a page already read; the cursor is not advancing",
                url=url)
        key = kind.address_field
        last_address = last.get(key) if isinstance(last, dict) else None
        if not isinstance(last_address, str):
            raise errors.MalformedPageError(f"{where}: the page's last item has no text {key!r}", url=url)
        cursor = parse_qs(parts.query, keep_blank_values=True).get("address", [None])[0]
        if cursor != last_address:
            raise errors.PagingError(
                f"{where}: paging.next continues after {cursor!r}, not after the page's last "
                f"record {last_address!r}; records could be skipped or repeated", url=url)
        return nxt, last_address

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
                f"{domain} {kind.value}: unreadable record for {address!r}: {exc}", url=url) from exc

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
