"""Reading one suppression list page by page, trusting no page that cannot be checked.

`paging.next` is followed as Mailgun returns it, once it is known to stay on the configured origin
and the list's path, to advance, and to continue after the page's last record. An empty, null or
missing `items` ends the list only when Mailgun's own last page agrees; anything else raises.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlsplit

from worker import errors
from worker.logs import get_logger
from worker.mailgun.transport import Transport, where
from worker.records import MalformedRecordError, Page, SuppressionList, staging_rows

log = get_logger(__name__)

# The longest URL sent: most servers refuse a request line over 8 KB, and a cursor is an address,
# which Mailgun may hold at any length (one of 10,000 characters has been seen).
MAX_URL = 4096


@dataclass(slots=True)
class RangeTrace:
    """Where one keyset range started and where it stopped, to check ranges meet end to end."""

    first: str | None = None    # the first record Mailgun gave the range (None: none at all)
    beyond: str | None = None   # the first record it saw past its upper bound (None: list ended)


class ListPull:
    """One pull of one list: the list, its URL and its query, set once. It keeps no reading's
    state, so the ranges of a ranged pull read through it at once."""

    def __init__(self, transport: Transport, domain: str, kind: SuppressionList, list_url: str, *,
                 page_limit: int, max_pages: int, term: str) -> None:
        self._transport = transport
        self._domain = domain
        self._kind = kind
        self._where = where(domain, kind)
        self._base = list_url
        self._tail = f"limit={page_limit}&term={quote_plus(term)}"
        self._page_limit = page_limit
        self._max_pages = max_pages

    async def pages(self, *, after: str | None = None, until: str | None = None, ordered: bool = False,
                    trace: RangeTrace | None = None, resumed: bool = False) -> AsyncGenerator[Page, None]:
        """Every page of the list, in order, following `paging.next` as Mailgun returns it.

        Ending normally means the list was read to its end (an empty, null or missing `items`), or,
        with `until`, past that address. Anything else raises: a PagingError for a page that cannot
        be trusted, a MailgunError for a request that failed. `after` starts behind that address
        (keyset resume); `resumed` says an earlier pull read the list up to `after`, so an empty
        last page cannot vouch for it either. With `until`, the range (after, until] is read. With
        `ordered` (implied by `until`), records must come in strictly increasing code-point order,
        else PagingOrderError.
        """
        ordered = ordered or until is not None
        kind = self._kind
        url, reread = self._resume_url(after) if after is not None else (f"{self._base}?{self._tail}", None)
        fetched: set[str] = set()
        number = 0
        previous = after  # the bound the next record must exceed, for the order check
        last_read = after if resumed else None
        # The next page is requested as soon as its URL is known and checked, so Mailgun's answer
        # travels while this page is normalised and stored.
        upcoming: asyncio.Future[dict[str, Any]] | None = asyncio.ensure_future(self._get(url))
        try:
            while upcoming is not None:
                payload = await upcoming
                upcoming = None
                if "paging" not in payload and "total_count" in payload:
                    if ordered:
                        raise errors.PagingOrderError(
                            f"{self._where}: the legacy offset form cannot be read in ranges", url=url)
                    async for page in self._offset_pages(payload):
                        yield page
                    return
                items = payload.get("items")
                if items is None or items == []:
                    await self._confirm_end(last_read, after)
                    return
                if not isinstance(items, list):
                    raise errors.MalformedPageError(
                        f"{self._where}: `items` is {type(items).__name__}, expected a list", url=url)
                fetched.add(url)
                next_url, last = self._next_url(payload, url, fetched, items[-1])
                if reread is not None:
                    items = self._past(items, reread)
                    if not items:  # nothing but records read before: where does the list end?
                        await self._confirm_end(reread, after)
                        return
                    reread = None
                if len(next_url) > MAX_URL:
                    next_url, reread = self._resume_url(last)
                    if next_url in fetched:
                        raise errors.PagingError(
                            f"{self._where}: records whose addresses are too long for a URL "
                            f"begin alike ({last[:80]!r}...); paging cannot get past them", url=url)
                beyond = until is not None and last > until
                if not beyond and number + 1 < self._max_pages:
                    upcoming = asyncio.ensure_future(self._get(next_url))
                number += 1
                page = self._page(number, url, items)
                if trace is not None and number == 1:
                    trace.first = page.items[0][kind.address_field]
                if ordered:
                    page, past = self._within(page, previous, until)
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
                f"{self._where}: stopped after {self._max_pages} pages without "
                "reaching the end of the list", url=url)
        finally:
            if upcoming is not None:
                upcoming.cancel()
                await asyncio.gather(upcoming, return_exceptions=True)

    async def ranges(self, pivots: Sequence[str]) -> AsyncGenerator[Page, None]:
        """Every page of the list, read as len(pivots) + 1 keyset ranges at once, in no particular
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
                async for page in self.pages(after=after, until=until, ordered=True, trace=trace):
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
            self._check_ranges_meet(traces)
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            if failed.done() and not failed.cancelled():
                failed.exception()  # retrieved, so it is not reported as never retrieved

    async def _get(self, url: str) -> dict[str, Any]:
        return await self._transport.get_json(url, self._domain, self._kind)

    def _page(self, number: int, url: str, items: list[Any]) -> Page:
        try:
            rows, skipped = staging_rows(self._kind, items)
        except MalformedRecordError as exc:
            raise errors.MalformedPageError(
                f"{self._where}: a record on the page is malformed: {exc}", url=url) from exc
        if skipped:
            # Mailgun has these records; the mirror cannot hold them. Said once a page, not a record.
            log.warning("records_skipped", domain=self._domain, list=self._kind.value, count=len(skipped),
                        url=url, examples=[f"{s.address[:80]!r}: {s.reason}" for s in skipped[:5]])
        return Page(number, url, self._kind, items, rows, skipped)

    def _next_url(self, payload: dict[str, Any], url: str, fetched: set[str],
                  last: object) -> tuple[str, str]:
        """Check `paging.next` before the key is sent anywhere with it; `last` is the page's last
        item, whose address the cursor must continue after. Returns the URL and that address."""
        paging = payload.get("paging")
        nxt = paging.get("next") if isinstance(paging, dict) else None
        if not isinstance(nxt, str) or not nxt:
            raise errors.MalformedPageError(
                f"{self._where}: a page with records has no paging.next, so the list cannot be "
                "read to its end", url=url)
        try:
            parts = urlsplit(nxt)
        except ValueError:  # an unclosed [IPv6] bracket
            raise errors.MalformedPageError(
                f"{self._where}: paging.next is not a URL, so the list cannot be read to its end",
                url=url) from None
        origin, api_base = self._transport.origin, self._transport.base
        if (parts.scheme, parts.netloc) != (origin.scheme, origin.netloc):
            raise errors.PagingError(
                f"{self._where}: paging.next points at {parts.scheme}://{parts.netloc}, not "
                f"{api_base}; not following it (the API key is only sent to {api_base})", url=url)
        if f"{parts.scheme}://{parts.netloc}{parts.path}" != self._base:
            raise errors.PagingError(
                f"{self._where}: paging.next points at another path ({parts.path})", url=url)
        if nxt in fetched:
            raise errors.PagingError(
                f"{self._where}: paging.next repeats a page already read; the cursor is not advancing",
                url=url)
        key = self._kind.address_field
        last_address = last.get(key) if isinstance(last, dict) else None
        if not isinstance(last_address, str):
            raise errors.MalformedPageError(
                f"{self._where}: the page's last item has no text {key!r}", url=url)
        cursor = parse_qs(parts.query, keep_blank_values=True).get("address", [None])[0]
        if cursor != last_address:
            raise errors.PagingError(
                f"{self._where}: paging.next continues after {cursor!r}, not after the page's last "
                f"record {last_address!r}; records could be skipped or repeated", url=url)
        return nxt, last_address

    def _resume_url(self, address: str) -> tuple[str, str | None]:
        """The URL of the records after `address`, and None. When that URL is too long, the URL
        after the longest prefix of the address that fits, and the address: the records from the
        prefix up to the address (all starting with the prefix, so too long to hold as well) come
        again, and are dropped by `_past`."""
        url = f"{self._base}?page=next&address={quote_plus(address)}&{self._tail}"
        if len(url) <= MAX_URL:
            return url, None
        room = MAX_URL - len(url) + len(quote_plus(address))
        end = size = 0
        while size + len(quote_plus(address[end])) <= room:
            size += len(quote_plus(address[end]))
            end += 1
        return f"{self._base}?page=next&address={quote_plus(address[:end])}&{self._tail}", address

    def _past(self, items: list[Any], read: str) -> list[Any]:
        """The items after the records read again from a shortened cursor: the leading ones up to
        `read` (up to it in code-point and in case-blind order, the orders Mailgun may keep)."""
        key = self._kind.address_field
        start = 0
        for item in items:
            address = item.get(key) if isinstance(item, dict) else None
            if not isinstance(address, str) or address > read or address.lower() > read.lower():
                break
            start += 1
            if address == read:
                break
        return items[start:]

    async def _confirm_end(self, last: str | None, after: str | None) -> None:
        """An empty page ends the list only if Mailgun's own last page agrees: a page cut short or
        emptied by mistake must not read as the end, or removals would follow.

        A complete pull ends on Mailgun's very last record, or beyond it if the tail changed
        meanwhile; "beyond" must hold both in code-point and in case-blind order, the two orders
        Mailgun may keep. A pager that read nothing after `after` is right only if nothing lies
        beyond `after`. A pager that read records is never vouched for by an empty last page: that
        is two answers disagreeing (say `items: null` mid-list and again at the end).
        """
        url = f"{self._base}?page=last&{self._tail}"
        payload = await self._get(url)
        items = payload.get("items")
        final = None
        if isinstance(items, list) and items and isinstance(items[-1], dict):
            final = items[-1].get(self._kind.address_field)
        bound = last if last is not None else after
        if final is None:
            if last is None:
                return  # this pager read nothing, and by both accounts nothing lies at the end
            if items:
                raise errors.MalformedPageError(f"{self._where}: the last page is unreadable", url=url)
            # Records were read, yet the last page is empty: the two answers disagree, and only a
            # last page that shows where the list ends may vouch for a pull.
            raise errors.PagingError(
                f"{self._where}: records were read up to {last!r}, but the list's last page "
                "is empty; the pull is incomplete", url=url)
        complete = bound is not None and isinstance(final, str) and final <= bound \
            and final.lower() <= bound.lower()
        if not complete:
            raise errors.PagingError(
                f"{self._where}: the list ended after {last or after or 'nothing'!r}, but "
                f"its last page ends with {final!r}; the pull is incomplete", url=url)

    def _within(self, page: Page, previous: str | None, until: str | None) -> tuple[Page, str | None]:
        """The page's records up to `until` (all without one), after checking they increase
        strictly (skipped ones too); and the first record past `until`, if any."""
        addresses = [item[self._kind.address_field] for item in page.items]
        for address in addresses:
            if previous is not None and not address > previous:
                raise errors.PagingOrderError(
                    f"{self._where}: {address[:200]!r} came after {previous[:200]!r}; "
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

    def _check_ranges_meet(self, traces: Sequence[RangeTrace]) -> None:
        """Each range must hand over to the next exactly where Mailgun's order continues: the
        first record past a range's bound is the first record of the next range. Otherwise the
        order is not code-point order around a pivot (or the list changed right there), records
        may have fallen between, and the caller reads the list with one pager instead."""
        for current, following in itertools.pairwise(traces):
            # A range that reached the end of the list (confirmed by Mailgun's last page) hands
            # over nothing; records the next range read may have been deleted meanwhile.
            if current.beyond is not None and current.beyond != following.first:
                raise errors.PagingOrderError(
                    f"{self._where}: a range stopped at {current.beyond!r} but the next began "
                    f"at {following.first!r}; the records are not in code-point order")

    async def _offset_pages(self, first: dict[str, Any]) -> AsyncIterator[Page]:
        """The legacy form: `{"total_count", "items"}` walked with `skip`.

        Offsets move when records before them come or go mid-pull: a deletion would slide an
        unread record below the offset, never to be read, and the pull would look complete. So
        every page after the first is asked from one record back and must hold the last record
        already read: what follows it is contiguous with what was read. Records added before
        that record come before it on the page and are left out (a keyset pull does not see
        them either). A page without it raises ListShiftedError: the list is read again.
        """
        payload, url, offset, number = first, f"{self._base}?limit={self._page_limit}", 0, 0
        anchor: object = None  # the last item read, which the next page must hold
        for _ in range(self._max_pages):
            items, total = payload.get("items"), payload.get("total_count")
            if items is None:
                items = []
            if not isinstance(items, list) or isinstance(total, bool) or not isinstance(total, int):
                raise errors.MalformedPageError(
                    f"{self._where}: a legacy page needs a number `total_count` and a list "
                    "of `items`", url=url)
            before, offset = offset, max(offset - 1, 0) + len(items)
            if not items and before < total:
                raise errors.PagingError(
                    f"{self._where}: the list ended after {before} of its {total} records; "
                    "the pull is incomplete", url=url)
            if anchor is not None:
                if anchor not in items:
                    raise errors.ListShiftedError(
                        f"{self._where}: the list changed during the pull (the page no longer "
                        "holds the last record read); a record may have slid past the offset", url=url)
                items = items[items.index(anchor) + 1:]
            if items:
                number += 1
                yield self._page(number, url, items)
                anchor = items[-1]
            elif offset < total and offset <= before:  # nothing new, yet the count says more
                raise errors.PagingError(
                    f"{self._where}: the list ended after {offset} of its {total} records; "
                    "the pull is incomplete", url=url)
            if offset >= total:
                return
            url = f"{self._base}?skip={offset - 1}&limit={self._page_limit}"
            payload = await self._get(url)
        raise errors.PagingError(f"{self._where}: stopped after {self._max_pages} pages", url=url)
