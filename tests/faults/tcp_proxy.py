"""A fault-injecting TCP proxy (asyncio) for the fault suite.

Put between the gateway and Redis or PostgreSQL; switch its mode while traffic runs:

- ``pass``: bytes go through untouched;
- ``latency``: every chunk, both ways, waits ``latency_s`` before it is forwarded;
- ``blackhole``: connections (open and new) are accepted and read, nothing is forwarded either
  way, nothing is closed: the peer sees a server that never answers;
- ``reset``: every open connection is reset (RST, via ``SO_LINGER`` 0) and new ones are reset
  as soon as they are accepted.

Back to ``pass`` after a blackhole, connections opened during it stay dead (their requests were
swallowed); the client must time them out, as it would on a real network.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Literal

Mode = Literal["pass", "latency", "blackhole", "reset"]

_CHUNK_BYTES = 65536


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.swallowed = False  # opened or caught in a blackhole: never forwards again

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.upstream)


class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.mode: Mode = "pass"
        self.latency_s = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.reset()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    def set_mode(self, mode: Mode, *, latency_s: float = 0.0) -> None:
        """Switch the mode; ``reset`` resets every open connection now, ``blackhole`` freezes
        them."""
        self.mode = mode
        self.latency_s = latency_s
        if mode == "blackhole":
            for link in self._links:
                link.swallowed = True
        if mode == "reset":
            for link in list(self._links):
                link.reset()
            self._links.clear()

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _reset(writer)  # the target is down: the client sees a refused-like reset
            return
        link = _Link(writer, up_writer)
        link.swallowed = self.mode == "blackhole"
        self._links.add(link)
        self._spawn(self._pump(link, reader, up_writer, from_client=True))
        self._spawn(self._pump(link, up_reader, writer, from_client=False))

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        from_client: bool,
    ) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK_BYTES)
                if not data:
                    break
                if self.mode == "latency" and self.latency_s:
                    await asyncio.sleep(self.latency_s)
                if link.swallowed:
                    continue  # read and dropped: a blackhole
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # A blackhole forwards no close either: only the client's own close ends it.
            if link in self._links and (from_client or not link.swallowed):
                self._links.discard(link)
                with contextlib.suppress(OSError, RuntimeError):
                    link.client.close()
                    link.upstream.close()
