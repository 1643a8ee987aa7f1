"""Large synthetic lists, generated straight into the emulator's tables (benchmarks, load tests).

Record i is `user{i:08d}@example.com`, so a database can generate the same addresses in SQL
(`format('user%s@example.com', lpad(i::text, 8, '0'))`) and the two sides can be set up to differ
in known ways.
"""

from __future__ import annotations

from collections.abc import Iterator

from worker.emulator.tables import WireRecord
from worker.records import SuppressionList

CREATED_AT = "Mon, 02 Mar 2026 10:00:00 UTC"
BOUNCE_CODE = "550"
BOUNCE_ERROR = "5.1.1 mailbox unavailable"


def synthetic_address(i: int) -> str:
    return f"user{i:08d}@example.com"


def synthetic_rows(kind: SuppressionList, count: int, start: int = 0) -> Iterator[WireRecord]:
    for i in range(start, start + count):
        address = synthetic_address(i)
        if kind is SuppressionList.BOUNCES:
            yield {"address": address, "code": BOUNCE_CODE, "error": BOUNCE_ERROR, "created_at": CREATED_AT}
        elif kind is SuppressionList.UNSUBSCRIBES:
            yield {"address": address, "tags": ["*"], "created_at": CREATED_AT}
        elif kind is SuppressionList.COMPLAINTS:
            yield {"address": address, "created_at": CREATED_AT}
        else:
            yield {"value": address, "reason": "", "type": "address", "createdAt": CREATED_AT}
