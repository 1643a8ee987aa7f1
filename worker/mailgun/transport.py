"""One request to Mailgun: sent with the API key, counted in the request budget, read under a size
cap, tried again under the retry policy, and a final answer turned into a typed error.

The transport owns no session: one `aiohttp.ClientSession` per process is opened by the caller and
shared. The API key travels only in the Authorization header of requests built for the configured
origin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson
from yarl import URL

from worker import errors
from worker.mailgun.budget import RequestBudget
from worker.mailgun.retry import Retryable, RetryPolicy, server_wait_hint
from worker.records import ListRef, SuppressionList
from worker.settings import region_of, validate_api_base

T = TypeVar("T")

# Mailgun's answer for an address a list does not hold (reference, section 5.3); compared without
# case or a trailing full stop.
NOT_LISTED = {
    SuppressionList.BOUNCES: "address not found in bounces table",
    SuppressionList.UNSUBSCRIBES: "address not found in unsubscribers table",
    SuppressionList.COMPLAINTS: "no spam complaints found for this address",
    SuppressionList.ALLOWLIST: "address/domain not found in whitelists table",
}


def where(domain: str, kind: SuppressionList | None) -> str:
    """What a request was about, for messages: a domain's list, or (no list) the domain listing."""
    return str(ListRef(domain, kind)) if kind is not None else "the account's domains"


@dataclass(frozen=True, slots=True)
class Reply:
    """A final answer: any status but 429 and 5xx, which are retried."""

    status: int
    body: bytes
    url: str

    def message(self) -> str:
        """Mailgun's `message`, or the start of a non-JSON body (a 401 is `text/plain`)."""
        try:
            payload = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return self.body[:200].decode("utf-8", "replace").strip()
        if isinstance(payload, dict) and isinstance(payload.get("message"), str):
            return str(payload["message"])
        return self.body[:200].decode("utf-8", "replace").strip()

    def not_listed(self, kind: SuppressionList) -> bool:
        """Whether this is Mailgun's own answer that the list does not hold the address."""
        return self.message().strip().rstrip(".").lower() == NOT_LISTED[kind]


class HttpObserver(Protocol):
    """Hears every answer (None: no answer at all) and every retry; metrics implement it."""

    def on_response(self, method: str, status: int | None) -> None: ...

    def on_retry(self, status: int | None) -> None: ...


class _Unobserved:
    def on_response(self, method: str, status: int | None) -> None:
        pass

    def on_retry(self, status: int | None) -> None:
        pass


class Transport:
    """Requests to one origin with one key; the client sets the defaults."""

    def __init__(self, session: aiohttp.ClientSession, *, api_base: str, api_key: str, retry: RetryPolicy,
                 max_response_bytes: int, timeout: float, observer: HttpObserver | None) -> None:
        self._session = session
        self.base = validate_api_base(api_base)
        self.origin = urlsplit(self.base)
        self._auth = aiohttp.encode_basic_auth("api", api_key)
        # What a refusal's text must never carry on into errors, logs and sync_runs.error: a
        # gateway in front of the API may quote the key, or the header, it refused.
        self._secrets = (api_key.encode(), self._auth.split()[-1].encode())
        self._retry = retry
        self._max_response_bytes = max_response_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._observer = observer or _Unobserved()
        self._budget = RequestBudget(reserve=2, max_wait=self._retry.backoff_max, sleep=self._retry.sleep)
        # The Domains API is limited on its own (reference §5.5): its answers must not make the
        # suppression lists wait, nor theirs the domain listing.
        self._domains_budget = RequestBudget(
            reserve=2, max_wait=self._retry.backoff_max, sleep=self._retry.sleep)

    async def request(self, method: str, url: str, domain: str, kind: SuppressionList, *,
                      json_body: bytes | None = None, form: dict[str, str] | None = None) -> Reply:
        """Send until Mailgun gives a final answer, and return it whatever its status."""
        return await self.retrying(partial(self.send, method, url, json_body=json_body, form=form),
                                   method, url, domain, kind)

    async def get_json(self, url: str, domain: str, kind: SuppressionList | None) -> dict[str, Any]:
        """A page as a JSON object; any other final answer raises. Without `kind`, a page of the
        domain listing, counted in the Domains API's budget."""
        budget = self._domains_budget if kind is None else self._budget

        async def attempt() -> dict[str, Any]:
            reply = await self.send("GET", url, budget=budget)
            if reply.status != 200:
                raise self.error(reply, domain, kind)
            try:
                payload = orjson.loads(reply.body)
            except orjson.JSONDecodeError as exc:
                # Usually a body cut short on the way; another try normally gets it whole.
                raise Retryable(f"page is not JSON ({exc})", status=reply.status) from None
            if not isinstance(payload, dict):
                raise Retryable(f"page is JSON {type(payload).__name__}, expected an object",
                                status=reply.status)
            return payload

        try:
            return await self.retrying(attempt, "GET", url, domain, kind)
        except errors.MailgunUnavailableError as exc:
            if exc.status == 200:
                raise errors.MalformedPageError(str(exc), status=200, url=url) from exc
            raise

    async def retrying(self, attempt: Callable[[], Awaitable[T]], method: str, url: str,
                       domain: str, kind: SuppressionList | None) -> T:
        """`attempt` tried again while it raises `Retryable`, under the retry policy."""
        try:
            async for try_ in self._retry.retrying(self._observer.on_retry, method=method, domain=domain,
                                                   list=kind.value if kind else "domains"):
                with try_:
                    return await attempt()
        except Retryable as exc:
            raise errors.MailgunUnavailableError(
                f"{where(domain, kind)}: {method} still failing after {self._retry.max_attempts} "
                f"attempts: {exc.reason}", status=exc.status, url=url) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def send(self, method: str, url: str, *, json_body: bytes | None = None,
                   form: dict[str, str] | None = None, budget: RequestBudget | None = None) -> Reply:
        """Send once; a retryable answer raises `Retryable`, any other is returned. `budget`:
        the request budget it counts in (the suppression lists' unless given)."""
        budget = budget or self._budget
        headers = {"Authorization": self._auth}
        data: Any = None
        if json_body is not None:
            headers["Content-Type"] = "application/json"
            data = json_body
        elif form is not None:
            data = form
        status: int | None = None
        await budget.spend()
        try:
            async with self._session.request(
                method, URL(url, encoded=True), headers=headers, data=data,
                allow_redirects=False, timeout=self._timeout,
            ) as response:
                status = response.status
                budget.note(response.headers)
                body = await self._read_capped(response, url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._observer.on_response(method, None)
            raise Retryable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        self._observer.on_response(method, status)
        if status == 429 or status >= 500:
            raise Retryable(f"HTTP {status}", status=status,
                            wait_hint=server_wait_hint(status, response.headers))
        if not 200 <= status < 300:
            body = self._redacted(body)
        return Reply(status, body, url)

    def _redacted(self, body: bytes) -> bytes:
        for secret in self._secrets:
            if secret and secret in body:
                body = body.replace(secret, b"[redacted]")
        return body

    async def _read_capped(self, response: aiohttp.ClientResponse, url: str) -> bytes:
        cap = self._max_response_bytes
        if response.content_length is not None and response.content_length > cap:
            raise errors.MalformedPageError(
                f"response of {response.content_length} bytes exceeds the {cap}-byte cap", url=url)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(256 * 1024):
            size += len(chunk)
            if size > cap:
                raise errors.MalformedPageError(
                    f"response exceeds the {cap}-byte cap", url=url)
            chunks.append(chunk)
        return b"".join(chunks)

    def error(self, reply: Reply, domain: str, kind: SuppressionList | None) -> errors.MailgunError:
        """A typed error for a final (non-retryable) answer. A domain asked of the wrong region
        gets a 401 or a 404 from Mailgun, so both name the region asked."""
        message = reply.message()
        place = where(domain, kind)
        named = region_of(self.base)
        region = self.base if named == self.base else f"the {named} region ({self.base})"
        if reply.status == 401:
            return errors.MailgunAuthError(
                f"{place}: Mailgun refused the API key (401 {message}) at {region}. Check "
                "MAILGUN_API_KEY, and that the domain lives in this region (US https://api.mailgun.net, "
                "EU https://api.eu.mailgun.net: MAILGUN_API_BASE, or `region` in SYNC_CONFIG)",
                status=401, mailgun_message=message, url=reply.url)
        if reply.status == 404:
            hint = (f"{region} does not know the domain: check its name, and that it lives in this "
                    "region (`region` in SYNC_CONFIG, or MAILGUN_API_BASE)"
                    if "domain not found" in message.lower() else "check the domain name and region")
            return errors.MailgunNotFoundError(
                f"{place}: Mailgun answered 404 ({message}); {hint}",
                status=404, mailgun_message=message, url=reply.url)
        if 300 <= reply.status < 400:
            return errors.MailgunRejectedError(
                f"{place}: Mailgun answered a redirect ({reply.status}), which is not followed",
                status=reply.status, mailgun_message=message, url=reply.url)
        return errors.MailgunRejectedError(
            f"{place}: Mailgun refused the request ({reply.status} {message})",
            status=reply.status, mailgun_message=message, url=reply.url)
