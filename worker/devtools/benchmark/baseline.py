"""The sync a user would write by hand, as the benchmark's yardstick: the official Mailgun SDK's
`stream()`, then one upsert per record, one delete per vanished row, and one add per local row.

Run as `python -m worker.devtools.benchmark.baseline` with MAILGUN_API_KEY, MAILGUN_API_BASE,
MAILGUN_DOMAINS (one domain) and DATABASE_URL. It prints one JSON line of counts.
"""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg
import orjson

from worker.devtools.sql import queries


async def main() -> None:
    from mailgun import AsyncClient  # the benchmark's extra dependency, not the worker's
    from mailgun.config import RetryPolicy

    domain = os.environ["MAILGUN_DOMAINS"]
    connection = await asyncpg.connect(os.environ["DATABASE_URL"])
    seen: set[str] = set()
    pulled = removed = pushed = 0
    async with AsyncClient(auth=("api", os.environ["MAILGUN_API_KEY"]),
                           api_url=os.environ["MAILGUN_API_BASE"],
                           retry_policy=RetryPolicy(max_retries=3)) as mailgun:
        async for record in mailgun.bounces.stream(domain=domain, filters={"limit": 1000}):
            await connection.execute(queries()["baseline_upsert"], domain, record["address"],
                                     str(record.get("code", "550")), record.get("error", ""),
                                     record["created_at"])
            seen.add(record["address"].lower())
            pulled += 1
        for row in await connection.fetch(queries()["baseline_synced_addresses"], domain):
            if row["address"].lower() not in seen:
                await connection.execute(queries()["baseline_delete"], domain, row["address"])
                removed += 1
        for row in await connection.fetch(queries()["baseline_pending"], domain):
            await mailgun.bounces.create(domain=domain, data={
                "address": row["address"], "code": row["code"], "error": row["error"]})
            await connection.execute(queries()["baseline_mark_synced"], domain, row["address"])
            pushed += 1
    await connection.close()
    sys.stdout.write(orjson.dumps({"pulled": pulled, "removed": removed, "pushed": pushed}).decode() + "\n")


if __name__ == "__main__":
    asyncio.run(main())
