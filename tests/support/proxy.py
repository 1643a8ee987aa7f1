"""A TCP proxy in front of PostgreSQL that can go silent: a server that stops answering (a network
partition, a stalled host) without closing a connection, which no error or refusal stands for; or
lose the connections open now for good while new ones work (a failover)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class SilentProxy:
    def __init__(self, database_url: str) -> None:
        self._upstream = urlsplit(database_url)
        self._flowing = asyncio.Event()
        self._flowing.set()
        # Connections opened before the last cut() carry nothing more, ever.
        self._generation = 0
        self._closed = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    def stall(self) -> None:
        """Forward nothing more either way, and connect nothing new: connections stay open."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Lose the connections open now for good, as a failover or a lost host does: nothing
        more goes through them either way and they are not closed; new connections work."""
        self._generation += 1

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        query = dict(parse_qsl(self._upstream.query))
        host = query.get("host") or self._upstream.hostname or "127.0.0.1"
        port = query.get("port") or self._upstream.port or 5432
        if host.startswith("/"):  # a Unix socket directory (an embedded server)
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, int(port))

    async def _pump(self, source: asyncio.StreamReader, target: asyncio.StreamWriter,
                    generation: int) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                await self._flowing.wait()
                if generation != self._generation:
                    await self._closed.wait()  # cut: nothing goes through, ever
                    break
                target.write(data)
                await target.drain()
        target.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        await self._flowing.wait()
        generation = self._generation
        try:
            up_reader, up_writer = await self._connect_upstream()
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pump(reader, up_writer, generation),
                             self._pump(up_reader, writer, generation))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SilentProxy]:
        """Listen on a free loopback port; `url` is the database URL through the proxy."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        query = urlencode([(k, v) for k, v in parse_qsl(self._upstream.query) if k not in ("host", "port")])
        user = self._upstream.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
        self.url = urlunsplit(self._upstream._replace(netloc=netloc, query=query))
        try:
            yield self
        finally:
            self.resume()
            self._closed.set()
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()
