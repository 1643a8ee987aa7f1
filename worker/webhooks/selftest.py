"""`mailgun-sync webhook-test`: sign and send sample events to a webhook endpoint, as Mailgun would,
and check each answer, so an installation can be checked end to end before Mailgun is pointed
at it. The samples are real writes: the test address lands in the mirror as synced rows, which
the next reconcile removes again (Mailgun does not have them).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from worker.webhooks.events import sign

TEST_RECIPIENT = "mailgun-sync-webhook-test@example.com"


def event_data(event: str, recipient: str, domain: str, *, severity: str | None = None,
               tags: list[str] | None = None, timestamp: float | None = None,
               reason: str = "generic", code: int | str = 550) -> dict[str, Any]:
    """An `event-data` object shaped as Mailgun's (see the API reference, section 7.2)."""
    now = time.time() if timestamp is None else timestamp
    data: dict[str, Any] = {
        "event": event, "id": secrets.token_urlsafe(16), "timestamp": now, "recipient": recipient,
        "recipient-domain": recipient.rpartition("@")[2], "tags": tags or [], "campaigns": [],
        "user-variables": {},
        "message": {"headers": {"to": recipient, "from": f"sender@{domain}",
                                "message-id": f"{int(now)}.{secrets.token_hex(6)}@{domain}"}},
        "storage": {"url": f"https://se.api.mailgun.net/v3/domains/{domain}/messages/{secrets.token_hex(8)}"},
    }
    if event == "failed":
        data.update(severity=severity or "permanent", reason=reason,
                    envelope={"sender": f"bounces@{domain}", "targets": recipient})
        data["delivery-status"] = {"code": code, "message": f"{code} 5.1.1 mailbox unavailable",
                                   "description": "", "attempt-no": 1}
    return data


def signed(key: str, data: dict[str, Any], *, token: str | None = None,
           timestamp: int | None = None) -> dict[str, Any]:
    """A webhook payload: `event-data` with a signature under `key`."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    token = token or secrets.token_hex(25)
    return {"signature": {"timestamp": stamp, "token": token, "signature": sign(key, stamp, token)},
            "event-data": data}


@dataclass
class Check:
    name: str
    expected: int
    status: int | None
    answer: str

    @property
    def ok(self) -> bool:
        return self.status == self.expected


def samples(key: str, domain: str, recipient: str) -> list[tuple[str, int, dict[str, Any]]]:
    """(name, expected status, payload) for every behaviour worth checking."""
    bounce = signed(key, event_data("failed", recipient, domain))
    forged = signed("not-the-signing-key", event_data("complained", recipient, domain))
    return [
        ("permanent failure -> bounces", 200, bounce),
        ("temporary failure -> ignored", 200,
         signed(key, event_data("failed", recipient, domain, severity="temporary", code=451))),
        ("complaint -> complaints", 200, signed(key, event_data("complained", recipient, domain))),
        ("unsubscribe -> unsubscribes", 200,
         signed(key, event_data("unsubscribed", recipient, domain, tags=["webhook-test"]))),
        ("the permanent failure again -> replay", 200, bounce),
        ("a wrong signature -> refused", 401, forged),
    ]


async def run_webhook_test(url: str, key: str, domain: str,
                           recipient: str = TEST_RECIPIENT) -> list[Check]:
    checks = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for name, expected, payload in samples(key, domain, recipient):
            try:
                async with session.post(url, data=orjson.dumps(payload),
                                        headers={"Content-Type": "application/json"}) as response:
                    text = (await response.text()).strip()
                    checks.append(Check(name, expected, response.status, text[:200]))
            except aiohttp.InvalidURL:
                raise  # no request could be made: the caller's to say, once
            except (aiohttp.ClientError, TimeoutError) as exc:
                checks.append(Check(name, expected, None, f"no answer: {str(exc) or type(exc).__name__}"))
    return checks


def render(url: str, checks: list[Check]) -> str:
    lines = [f"webhook test of {url}"]
    for check in checks:
        got = check.status if check.status is not None else "-"
        lines.append(f"  {'ok  ' if check.ok else 'FAIL'} {check.name:<40} expected {check.expected}, "
                     f"got {got}: {check.answer}")
    failed = sum(not c.ok for c in checks)
    lines.append("all answers as expected" if not failed else f"{failed} answer(s) not as expected")
    return "\n".join(lines) + "\n"
