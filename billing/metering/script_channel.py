"""A pipelined Redis connection for the hot path's Lua scripts (reserve and settle).

Why not plain redis-py here: its per-command machinery (pool checkout, command packing,
timeout wrappers) was the largest share of a billed request's CPU. This channel keeps one
connection, packs commands with
``hiredis.pack_command`` and parses replies with ``hiredis.Reader`` (both from the hiredis
library), and writes every command issued in one event-loop iteration in a single send, so
concurrent requests share round trips. Everything else (poster, sweeper, admin) uses redis-py.
On a Redis Cluster, ``billing.metering.cluster_channel.ClusterChannel`` keeps one per master
and takes the redirect replies (``on_redirect``) instead of failing the command with them.

Failure behaviour: a connection error, or a reply slower than ``timeout_s``, fails every
command in flight with ``ConnectionError`` and drops the connection (replies are matched to
commands by order, so a late reply could not be trusted); the next command reconnects.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

#: The error replies of a Redis Cluster that say "not here, or not now": the command did not
#: run (``billing.metering.cluster_channel``).
CLUSTER_REDIRECTS = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")

_Waiter = tuple[asyncio.Future[Any], float, tuple[Any, ...], int]

#: ``(reply future, command, error message, redirects so far, the channel that got it)``.
RedirectHandler = Callable[[asyncio.Future[Any], tuple[Any, ...], str, int, "ScriptChannel"], None]


class PipelinedChannel(Protocol):
    """What the callers of a pipelined channel use: ``ScriptChannel`` (one Redis) and
    ``billing.metering.cluster_channel.ClusterChannel`` (a Redis Cluster) both offer it."""

    decode_responses: bool

    def preload(self, script: str) -> None: ...

    async def execute(self, *command: Any) -> Any: ...

    def submit(self, *command: Any) -> asyncio.Future[Any] | None: ...

    def send(self, *command: Any) -> tuple[asyncio.Future[Any], asyncio.Future[bool]] | None: ...

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[Any]) -> Any: ...

    async def wait_idle(self) -> None: ...

    async def close(self) -> None: ...


class _Protocol(asyncio.Protocol):
    def __init__(self, channel: ScriptChannel) -> None:
        self._channel = channel
        self._reader = (
            hiredis.Reader(encoding="utf-8", errors="replace")
            if channel.decode_responses
            else hiredis.Reader()
        )
        self.transport: asyncio.Transport | None = None
        # (future, loop time sent, command, redirects so far), oldest first: replies come
        # back in the order sent. The command is kept for a redirect (``on_redirect``).
        self.waiters: deque[_Waiter] = deque()
        self.watchdog: asyncio.TimerHandle | None = None
        self.outgoing: list[bytes] = []
        self.flush_scheduled = False
        # Resolved by the next flush: is everything it wrote in the kernel's socket buffer?
        # One future per command, so a cancelled waiter cancels only its own.
        self.written: list[asyncio.Future[bool]] = []
        # The loop this connection runs on, kept: ``asyncio.get_running_loop()`` makes a
        # getpid system call on every call (CPython 3.11), ~1 µs; the per-command paths
        # use this instead (docs/benchmarks.md, "Measurements behind the code").
        self.loop = asyncio.get_running_loop()
        self.closed = self.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiters = self.waiters
        while (reply := self._reader.gets()) is not False:
            if not waiters:
                self._fail(RedisConnectionError("reply without a command"))
                return
            future, _, command, redirects = waiters.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                message = str(reply)
                on_redirect = self._channel.on_redirect
                if on_redirect is not None and message.startswith(CLUSTER_REDIRECTS):
                    on_redirect(future, command, message, redirects, self._channel)
                    continue
                error = NoScriptError if message.startswith("NOSCRIPT") else ResponseError
                future.set_exception(error(message))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"redis connection lost: {exc or 'closed'}"))

    def flush(self) -> None:
        self.flush_scheduled = False
        data, self.outgoing = b"".join(self.outgoing), []
        if not data or self.transport is None:
            self._report_written(False)
            return
        if self.transport.is_closing():
            self._fail(RedisConnectionError("redis connection closed"))
            return
        self.transport.write(data)
        self._report_written(self.transport.get_write_buffer_size() == 0)

    def _report_written(self, in_kernel: bool) -> None:
        written, self.written = self.written, []
        for future in written:
            if not future.done():
                future.set_result(in_kernel)

    def _fail(self, exc: Exception) -> None:
        self.outgoing.clear()
        self._report_written(False)
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        while self.waiters:
            future = self.waiters.popleft()[0]
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()
        self._channel._protocol_lost(self)
        if not self.closed.done():
            self.closed.set_result(None)


class ScriptChannel:
    """Runs EVALSHA (and a few plain commands) over one pipelined connection.

    Args:
        url: ``redis://[user:password@]host:port/db`` (the same ``REDIS_URL`` as redis-py).
        timeout_s: the longest a reply may take before the connection is dropped.
        name: the connection's ``CLIENT SETNAME`` (what ``CLIENT LIST`` shows an operator).
        decode_responses: replies' strings decoded as UTF-8 (an invalid byte becomes
            U+FFFD); False: ``bytes`` as Redis sent them (the settlement poster's reads).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        name: str | None = None,
        decode_responses: bool = True,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "redis":
            raise ValueError("ScriptChannel supports redis:// URLs only")
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._db = int(parsed.path.lstrip("/") or 0)
        self._username = unquote(parsed.username) if parsed.username else None
        self._password = unquote(parsed.password) if parsed.password else None
        self._timeout_s = timeout_s
        self._name = name
        self.decode_responses = decode_responses
        self._preloaded: list[str] = []
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        #: Set by ``ClusterChannel``: takes a Redis Cluster redirect reply (``MOVED``,
        #: ``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``) instead of failing the command with it.
        self.on_redirect: RedirectHandler | None = None
        #: Set by ``ClusterChannel``: told when the connection is lost.
        self.on_connection_lost: Callable[[], None] | None = None

    def preload(self, script: str) -> None:
        """Load ``script`` (Lua source) on every connect, so EVALSHA finds it even right
        after Redis restarted; only a live ``SCRIPT FLUSH`` can still cause NOSCRIPT."""
        self._preloaded.append(script)

    def _protocol_lost(self, protocol: _Protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
        if self.on_connection_lost is not None:
            self.on_connection_lost()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self._host, self._port),
                self._timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to redis: {exc}") from exc
        try:
            await self._set_up(protocol)
        except BaseException as exc:
            # Never leave a half-opened connection behind (a stalled Redis would collect
            # one per attempt), and report a slow setup as the connection failure it is.
            protocol._fail(RedisConnectionError(f"redis connection setup failed: {exc!r}"))
            if isinstance(exc, TimeoutError | RedisConnectionError | OSError):
                raise RedisConnectionError(
                    f"redis connection setup took over {self._timeout_s}s or failed: {exc!r}"
                ) from exc
            raise
        return protocol

    async def _set_up(self, protocol: _Protocol) -> None:
        """AUTH, CLIENT SETNAME, SELECT and SCRIPT LOAD of the preloaded scripts, each within
        ``timeout_s``.

        Raises:
            TimeoutError: Redis did not answer one of them in time.
            redis.exceptions.ConnectionError: the connection dropped meanwhile.
        """
        loop = asyncio.get_running_loop()
        setup: list[tuple[Any, ...]] = []
        if self._password is not None:
            auth = (
                ("AUTH", self._username, self._password)
                if self._username
                else ("AUTH", self._password)
            )
            setup.append(auth)
        if self._name is not None:
            setup.append(("CLIENT", "SETNAME", self._name))
        if self._db:
            setup.append(("SELECT", self._db))
        setup.extend(("SCRIPT", "LOAD", script) for script in self._preloaded)
        for command in setup:
            future = loop.create_future()
            protocol.waiters.append((future, loop.time(), command, 0))
            assert protocol.transport is not None
            protocol.transport.write(hiredis.pack_command(command))
            await asyncio.wait_for(future, self._timeout_s)

    async def connect(self) -> None:
        """Connect now (a no-op when connected), so ``submit`` and ``send`` have a connection.

        Raises:
            redis.exceptions.ConnectionError: unreachable, or the setup failed or was slow.
        """
        await self._ready()

    @property
    def busy(self) -> bool:
        """Whether a command sent on the connection still waits for its reply."""
        protocol = self._protocol
        return protocol is not None and bool(protocol.waiters)

    async def _ready(self) -> _Protocol:
        if self._protocol is not None:
            return self._protocol
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            try:
                self._protocol = await self._connecting
            finally:
                self._connecting = None
            return self._protocol
        return await asyncio.shield(self._connecting)

    async def execute(self, *command: Any) -> Any:
        """Send one command; its reply (strings decoded as UTF-8 unless ``decode_responses``
        is False).

        Raises:
            redis.exceptions.ConnectionError: unreachable, dropped or too slow.
            redis.exceptions.ResponseError: Redis answered an error (``NoScriptError`` for
                an unknown script SHA).
        """
        protocol = self._protocol or await self._ready()
        return await self._enqueue(protocol, command)

    def submit(self, *command: Any) -> asyncio.Future[Any] | None:
        """Queue one command like ``execute`` and return the future of its reply (failing like
        ``execute``), or ``None`` when there is no connection yet (use ``execute``). Awaiting
        the bare future costs no coroutine frames."""
        protocol = self._live_protocol()
        return None if protocol is None else self._enqueue(protocol, command)

    def send(self, *command: Any) -> tuple[asyncio.Future[Any], asyncio.Future[bool]] | None:
        """Queue one command like ``execute`` (it goes out with this loop iteration's batch)
        without waiting for its reply.

        Returns:
            ``(reply, written)``: the future of its reply (failing like ``execute``), and a
            future resolved when the batch was written: True if the whole batch is then in
            the kernel's socket buffer, which delivers it to Redis even if this process dies
            the next instant. ``None`` when there is no connection yet (use ``execute``).
        """
        protocol = self._live_protocol()
        if protocol is None:
            return None
        written = protocol.loop.create_future()
        protocol.written.append(written)
        return self._enqueue(protocol, command), written

    def _live_protocol(self) -> _Protocol | None:
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            return None
        return protocol

    def resend(self, future: asyncio.Future[Any], command: tuple[Any, ...], redirects: int) -> bool:
        """Queue a command another node redirected here (``on_redirect``), its reply to
        resolve ``future``, the one its caller awaits; False when there is no connection
        (``connect`` first)."""
        protocol = self._live_protocol()
        if protocol is None:
            return False
        self._enqueue(protocol, command, future, redirects)
        return True

    def _enqueue(
        self,
        protocol: _Protocol,
        command: tuple[Any, ...],
        future: asyncio.Future[Any] | None = None,
        redirects: int = 0,
    ) -> asyncio.Future[Any]:
        """Queue ``command`` for this loop iteration's write; the future of its reply (a
        new one unless ``future`` is given)."""
        loop = protocol.loop
        if future is None:
            future = loop.create_future()
        now = loop.time()
        protocol.waiters.append((future, now, command, redirects))
        protocol.outgoing.append(hiredis.pack_command(command))
        if not protocol.flush_scheduled:
            protocol.flush_scheduled = True
            loop.call_soon(protocol.flush)
        if protocol.watchdog is None:
            protocol.watchdog = loop.call_at(now + self._timeout_s, self._watch, protocol)
        return future

    def _watch(self, protocol: _Protocol) -> None:
        """Fail the connection if its oldest unanswered command is over ``timeout_s`` old.

        One timer per connection rather than one per command (arming and cancelling a timer
        for every command is a cost on every request). It re-arms for the oldest command's
        deadline while
        commands are in flight, so a reply is late by at most ``timeout_s`` plus a tick.
        """
        protocol.watchdog = None
        if not protocol.waiters:
            return
        deadline = protocol.waiters[0][1] + self._timeout_s
        loop = protocol.loop
        if loop.time() >= deadline:
            protocol._fail(RedisConnectionError(f"redis reply took over {self._timeout_s}s"))
        else:
            protocol.watchdog = loop.call_at(deadline, self._watch, protocol)

    async def wait_idle(self) -> None:
        """Wait until every command sent has its reply or has failed (at shutdown: a failure
        runs its callbacks). Bounded by the watchdog: at most about ``2 * timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self._timeout_s
        while self.busy:
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # let the replies' done callbacks run

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script by SHA, loading it first if Redis does not know it."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.execute("SCRIPT", "LOAD", script)
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def close(self) -> None:
        """Close the connection (commands in flight fail with ConnectionError)."""
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            await protocol.closed
