"""Badly signed webhooks at a steady rate: `python -m worker.devtools.benchmark.flood URL RATE DOMAIN`.

It runs in a process of its own, so the benchmark's sender of good deliveries keeps its core
time, and speaks HTTP/1.1 over plain keep-alive streams instead of a client library, so that
the machine's cores go to the daemon rather than to the flood. Sends until SIGTERM, then prints
one JSON object: the requests answered, the rate achieved, and the answers by status.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import Counter
from urllib.parse import urlsplit

import orjson

from worker.webhooks.selftest import event_data, signed

# Well-formed deliveries under a key that is not the daemon's: each costs the daemon a read and
# an HMAC check, and must be answered 401.
WRONG_KEY = "not-the-signing-key"
BODIES = 100
CONNECTIONS = 64


def requests(url: str, domain: str) -> list[bytes]:
    parts = urlsplit(url)
    out = []
    for i in range(BODIES):
        body = orjson.dumps(signed(WRONG_KEY, event_data("complained", f"flood{i}@example.com", domain)))
        out.append(f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return out


async def _connection(url: str, queue: asyncio.Queue[bytes | None], answers: Counter[str],
                      idle: list[int]) -> None:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        while (request := await queue.get()) is not None:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next((int(line.split(":", 1)[1]) for line in lines
                           if line.lower().startswith("content-length:")), 0)
            await reader.readexactly(length)
            answers[lines[0].split()[1]] += 1
            idle[0] += 1
    except (OSError, asyncio.IncompleteReadError):
        answers["error"] += 1
    finally:
        writer.close()


async def flood(url: str, rate: float, domain: str) -> dict[str, object]:
    bodies = requests(url, domain)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    answers: Counter[str] = Counter()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    idle = [CONNECTIONS]  # connections not waiting for an answer
    workers = [asyncio.create_task(_connection(url, queue, answers, idle)) for _ in range(CONNECTIONS)]
    started = loop.time()
    due = 0
    while not stop.is_set():
        await asyncio.sleep(0.001)
        # Every request due by now goes to an idle connection; with none idle the daemon is
        # behind, and the request is counted as skipped instead of queued.
        while started + due / rate <= loop.time():
            if idle[0]:
                idle[0] -= 1
                queue.put_nowait(bodies[due % BODIES])
            else:
                answers["skipped"] += 1
            due += 1
    seconds = loop.time() - started
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    answered = sum(n for status, n in answers.items() if status not in ("skipped", "error"))
    return {"seconds": round(seconds, 3), "answered": answered,
            "achieved_per_s": round(answered / seconds) if seconds else 0, "answers": dict(answers)}


def main() -> None:
    url, rate, domain = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    sys.stdout.write(orjson.dumps(asyncio.run(flood(url, rate, domain))).decode() + "\n")


if __name__ == "__main__":
    main()
