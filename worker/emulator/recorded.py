"""Records exactly as Mailgun returned them in recorded responses (reference sections 4 and 6),
oddities included, so that seeds, the demo and tests meet what real lists hold."""

from __future__ import annotations

from typing import Any

# The unsubscribes list recorded on 2020-02-03 (reference §6.6): one record has an empty address.
RECORDED_UNSUBSCRIBES: list[dict[str, Any]] = [
    {"address": "", "tags": ["*", "Bar", "Survey Requests"], "created_at": "Tue, 12 Feb 2019 18:26:14 UTC"},
    {"address": "bob@example.com", "tags": ["*", "FOO"], "created_at": "Fri, 18 Jan 2019 19:39:23 UTC"},
    {"address": "integration-test-email@DOMAIN.TEST", "tags": ["*"],
     "created_at": "Mon, 03 Feb 2020 19:51:18 UTC"},
    {"address": "lukasbbarry@gmail.com", "tags": ["O2 Survey Response2"],
     "created_at": "Tue, 17 Sep 2019 21:07:11 UTC"},
]

# Bounces as recorded in 2020 and 2026 (reference §4.1): a `MessageHash` on one, a free-text code.
RECORDED_BOUNCES: list[dict[str, Any]] = [
    {"address": "integration-test-email@DOMAIN.TEST", "code": "550", "error": "Integration Test",
     "created_at": "Mon, 03 Feb 2020 19:50:58 UTC",
     "MessageHash": "4e7b5c06763fbd18060548d8b18687e492b255a7"},
    {"address": "test777@example.info", "code": "777", "error": "integration testing123",
     "created_at": "Thu, 26 Mar 2026 12:59:15 UTC"},
]
