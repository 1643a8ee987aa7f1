"""The account's sending domains in one region, as `GET /v3/domains` lists them: read whole, or not
at all, since a domain missed is unscheduled and its webhooks refused."""

from __future__ import annotations

from dataclasses import dataclass

from worker import errors
from worker.logs import get_logger
from worker.mailgun.transport import Transport

log = get_logger(__name__)

# `GET /v3/domains` pages by offset; 1000 is the largest page Mailgun documents for it.
DOMAIN_PAGE = 1000
# Readings of the domain listing when it shifts while being read; then discovery keeps the last
# complete listing.
DOMAIN_LISTING_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class AccountDomain:
    """A sending domain of the account, as `GET /v3/domains` lists it."""

    name: str
    state: str
    disabled: bool


async def list_account_domains(transport: Transport, *, max_pages: int) -> list[AccountDomain]:
    """Every domain of the account at the transport's origin (offset paging: `skip` and `limit`,
    with `total_count`). Reads to the end or raises: a listing that shifted while it was read is
    read again, up to DOMAIN_LISTING_ATTEMPTS times in all."""
    for attempt in range(1, DOMAIN_LISTING_ATTEMPTS + 1):
        try:
            return await _read_listing(transport, max_pages)
        except errors.ListShiftedError as exc:
            if attempt == DOMAIN_LISTING_ATTEMPTS:
                raise
            log.warning("domain_listing_restarted", reason=str(exc), attempt=attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _read_listing(transport: Transport, max_pages: int) -> list[AccountDomain]:
    """One reading of the listing, returned only if complete. Offsets move when domains before
    them come or go between pages (a deletion and an addition even leave `total_count` as it was),
    so every page after the first is asked from one domain back and must begin with the last
    domain read; else, or if the total changed, ListShiftedError."""
    found: list[AccountDomain] = []
    first_total: int | None = None
    for _ in range(max_pages):
        skip = max(len(found) - 1, 0)
        url = f"{transport.base}/v3/domains?limit={DOMAIN_PAGE}&skip={skip}"
        payload = await transport.get_json(url, "", None)
        items, total = payload.get("items"), payload.get("total_count")
        if not isinstance(items, list) or isinstance(total, bool) or not isinstance(total, int):
            raise errors.MalformedPageError(
                "the account's domains: a page needs a list `items` and a number `total_count`",
                url=url)
        page = [_account_domain(item, url) for item in items]
        first_total = total if first_total is None else first_total
        if total != first_total:
            raise errors.ListShiftedError(
                f"the account's domains: total_count changed from {first_total} to {total} "
                "while listing", url=url)
        if found:
            if not page or page[0].name != found[-1].name:
                raise errors.ListShiftedError(
                    f"the account's domains changed while listing: the page at {skip} does not "
                    f"begin with {found[-1].name!r}, the last domain read", url=url)
            page = page[1:]
        found.extend(page)
        if len(found) >= total:
            return found
        if not page:
            raise errors.PagingError(
                f"the account's domains: the listing ended at {len(found)} of {total}", url=url)
    raise errors.PagingError(f"the account's domains: stopped after {max_pages} pages")


def _account_domain(item: object, url: str) -> AccountDomain:
    name = item.get("name") if isinstance(item, dict) else None
    if not isinstance(item, dict) or not isinstance(name, str) or not name:
        raise errors.MalformedPageError(
            f"the account's domains: an item without a text `name`: {str(item)[:200]}", url=url)
    state = str(item.get("state") or "")
    return AccountDomain(name, state, item.get("is_disabled") is True or state == "disabled")
