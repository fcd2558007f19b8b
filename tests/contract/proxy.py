"""A TCP proxy in the test's event loop, to take a broker away from one publisher only.

The brokers are shared by every test run on the machine, so they cannot be stopped; a publisher
pointed at the proxy instead sees its broker go down (:meth:`TcpProxy.down`: connections cut, port
closed), stall (:meth:`TcpProxy.stall`: connections accepted and kept, nothing forwarded either way),
drop its connections (:meth:`TcpProxy.drop`) and come back (:meth:`TcpProxy.up`, same port).
:meth:`TcpProxy.wait_sent` waits until the clients sent so many bytes on, to cut a batch midway.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.live = 0
        """Client connections open right now (a closed publisher must leave none)."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.sent = 0
        """Bytes forwarded from the clients to the broker so far."""
        self._sent_more = asyncio.Event()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def up(self) -> None:
        """Listen (again, on the same port) and forward."""
        self._flowing.set()
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        """Stop listening and cut every connection: the broker is unreachable."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)

    async def drop(self) -> None:
        """Cut every connection but keep listening: the broker closed them and is still there."""
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.sleep(0)

    def stall(self) -> None:
        """Keep every connection (and accept new ones) but forward nothing: a broker that hangs."""
        self._flowing.clear()

    async def wait_sent(self, count: int) -> None:
        """Until ``sent`` is at least ``count`` (bound it with ``asyncio.timeout``)."""
        while self.sent < count:
            self._sent_more.clear()
            await self._sent_more.wait()

    async def wait_idle(self) -> None:
        """Until no client connection is open (bound it with ``asyncio.timeout``)."""
        await self._idle.wait()

    async def close(self) -> None:
        await self.down()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        self.live += 1
        self._idle.clear()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            self._writers.add(upstream_writer)
            await asyncio.gather(
                self._pump(client_reader, upstream_writer, upstream=True), self._pump(upstream_reader, client_writer)
            )
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.transport.abort()
            self._tasks.discard(task)
            self.live -= 1
            if not self.live:
                self._idle.set()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool = False
    ) -> None:
        while data := await reader.read(65536):
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()
            if upstream:
                self.sent += len(data)
                self._sent_more.set()
        writer.transport.abort()
