"""Run as `unshare -n python -m tests.support.lost_network URL DEAD_AFTER GIVE_UP`: in a network
namespace of its own, connect to PostgreSQL over loopback TCP (a proxy to the server's Unix socket,
which no namespace hides), start a statement, then take the namespace's network down. The server is
then lost without a word at the kernel's level, as a failed-over or powered-off host is: no process
is left to acknowledge anything, which no proxy in user space can stand for. Prints how the
statement ended, as JSON."""

from __future__ import annotations

import asyncio
import sys

import orjson

from tests.support.proxy import SilentProxy
from worker.database import open_pool, wrap_db_errors
from worker.errors import DatabaseError


async def loopback(state: str) -> None:
    ip = await asyncio.create_subprocess_exec("ip", "link", "set", "lo", state)
    assert await ip.wait() == 0, f"ip link set lo {state} failed"


async def statement_on_a_lost_server(database_url: str, dead_after: float,
                                     give_up: float) -> dict[str, object]:
    await loopback("up")
    async with SilentProxy(database_url).running() as proxy, \
            open_pool(proxy.url, max_size=1, dead_after=dead_after) as pool:
        connection = await pool.acquire()
        loop = asyncio.get_running_loop()

        async def wait_for_the_answer() -> None:
            async with wrap_db_errors("waiting for a long statement"):
                await connection.fetchval("SELECT pg_sleep(600)")

        statement = asyncio.create_task(wait_for_the_answer())
        await asyncio.sleep(0.5)  # the server has the statement and is working on it
        await loopback("down")
        lost = loop.time()
        try:
            await asyncio.wait_for(asyncio.shield(statement), give_up)
        except DatabaseError as exc:
            return {"outcome": "failed", "seconds": round(loop.time() - lost, 1), "error": str(exc)}
        except TimeoutError:
            statement.cancel()
            connection.terminate()
            return {"outcome": "still waiting", "seconds": round(loop.time() - lost, 1)}
        finally:
            await pool.release(connection)
        return {"outcome": "answered"}


if __name__ == "__main__":
    url, dead_after, give_up = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    sys.stdout.write(orjson.dumps(asyncio.run(statement_on_a_lost_server(url, dead_after, give_up))).decode())
