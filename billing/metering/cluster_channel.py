"""The hot path's pipelined script channel on a Redis Cluster (``REDIS_CLUSTER=true``).

One ``ScriptChannel`` per master node, and a slot map read with ``CLUSTER SLOTS`` from any
node (``REDIS_URL`` names one; the rest are discovered). Each command goes to the master that
owns the hash slot of its first key (``command_slot``), pipelined with the other commands of
the same event-loop iteration to that node, so it keeps ``ScriptChannel``'s interface and
costs: ``HoldStore`` and the poster do not know which one they have. A redirect is taken
where the node's reply is parsed (``ScriptChannel.on_redirect``) and the command re-queued on
the right node with the future its caller awaits (``ScriptChannel.resend``): the success path
costs one slot computation (a CRC of the first key) and nothing else.

Redirects (Redis Cluster specification, "Redirection and resharding"), at most
``MAX_REDIRECTS`` per command, each of them an answer that says the command did not run:
- ``MOVED slot host:port``: the slot has a new owner (a slot migration finished, or a replica
  was promoted). The slot is pointed at that node at once, the command is sent there, and the
  whole map is read again in the background.
- ``ASK slot host:port``: the slot is being migrated and the keys are already on the target.
  ``ASKING`` and the command go to the target once, back to back on its connection (the
  ``ASKING`` flag holds for the next command only); the map is unchanged.
- ``TRYAGAIN`` (a multi-key command while its slot is being migrated, some keys moved:
  a script naming a key that does not exist yet, such as a settle's marker, gets it for the
  whole migration) and ``CLUSTERDOWN`` (a slot without a master, during a failover): sent
  again to the slot's owner after a short wait that doubles from ``RETRY_DELAY_S``.

A connection lost to a node fails its commands in flight with ``ConnectionError`` as on one
node (the script may have run: the callers' retries, the settlement rescue, decide; they
are never re-sent here) and has the map read again, so that after a failover the next
command finds the promoted replica.

Failure behaviour: every error is ``ScriptChannel``'s (``ConnectionError``, ``ResponseError``,
``NoScriptError``); a command still redirected after ``MAX_REDIRECTS`` fails with its last
error reply (a ``ResponseError``), and one whose slot has no reachable master with
``ConnectionError``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlparse

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from billing.metering.script_channel import ScriptChannel

log = logging.getLogger(__name__)

#: Redirects and retries one command may take before its last error reply is the answer.
MAX_REDIRECTS = 16
#: The first wait before a command refused with TRYAGAIN or CLUSTERDOWN is sent again; it
#: doubles with each retry, up to ``MAX_RETRY_DELAY_S`` (about 3 s over ``MAX_REDIRECTS`` retries).
RETRY_DELAY_S = 0.01
MAX_RETRY_DELAY_S = 0.25
#: The shortest time between two background reads of the slot map (a failover makes every
#: command in flight to the lost master ask for one).
MIN_REFRESH_INTERVAL_S = 0.1

_SCRIPT_COMMANDS = frozenset({"EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL", "FCALL_RO"})
_STREAM_READS = frozenset({"XREAD", "XREADGROUP"})
_MOVED = "MOVED"
_ASK = "ASK"
_RETRY_LATER = ("TRYAGAIN", "CLUSTERDOWN")

Address = tuple[str, int]


def command_slot(command: tuple[Any, ...]) -> int:
    """The hash slot a command is routed by: its first key's.

    The first key: ``EVALSHA``/``EVAL``/``FCALL``: the argument after the key count (a
    command with no key: slot 0, any master runs it); ``XREAD``/``XREADGROUP``: the one after
    ``STREAMS``; any other command: its first argument (keyless: slot 0).
    """
    if command[0] == "EVALSHA":  # the hot path's reserve and settle
        return key_slot(str(command[3]).encode()) if int(command[2]) > 0 else 0
    name = command[0]
    name = (name.decode() if isinstance(name, bytes) else str(name)).upper()
    key: Any = None
    if name in _SCRIPT_COMMANDS:
        if int(command[2]) > 0:
            key = command[3]
    elif name in _STREAM_READS:
        words = [w.decode() if isinstance(w, bytes) else str(w) for w in command]
        key = command[[w.upper() for w in words].index("STREAMS") + 1]
    elif len(command) > 1:
        key = command[1]
    if key is None:
        return 0
    return key_slot(key if isinstance(key, bytes) else str(key).encode())


@dataclass(frozen=True, slots=True)
class Redirect:
    """A Redis Cluster redirect or retry answer.

    Attributes:
        kind: ``MOVED``, ``ASK``, ``TRYAGAIN`` or ``CLUSTERDOWN``.
        slot: the slot named (MOVED and ASK), else None.
        address: the node to send the command to (MOVED and ASK), else None.
    """

    kind: str
    slot: int | None = None
    address: Address | None = None


def parse_redirect(message: str, asked: Address) -> Redirect | None:
    """The redirect an error reply says, or None for any other error.

    ``asked``: the node that answered; a redirect without a host (``MOVED 3999 :6381``)
    means that node's host.
    """
    kind, _, rest = message.partition(" ")
    if kind in _RETRY_LATER:
        return Redirect(kind)
    if kind not in (_MOVED, _ASK):
        return None
    slot, _, endpoint = rest.partition(" ")
    host, _, port = endpoint.rpartition(":")
    return Redirect(kind, int(slot), (host or asked[0], int(port)))


class ClusterChannel:
    """Runs EVALSHA (and a few plain commands) over one pipelined connection per master of a
    Redis Cluster, following slot ownership (see the module docstring).

    Args:
        url: ``redis://[user:password@]host:port[/0]``: any node of the cluster (a cluster
            has database 0 only).
        timeout_s: the longest a reply may take before a node's connection is dropped.
        name: every connection's ``CLIENT SETNAME``.
        decode_responses: as ``ScriptChannel``'s.
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
            raise ValueError("ClusterChannel supports redis:// URLs only")
        if parsed.path.lstrip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has database 0 only; REDIS_URL names another")
        self._seed: Address = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        credentials = parsed.netloc.rpartition("@")[0]
        self._credentials = f"{credentials}@" if credentials else ""
        self._timeout_s = timeout_s
        self._name = name
        self.decode_responses = decode_responses
        self._preloaded: list[str] = []
        self._nodes: dict[Address, ScriptChannel] = {}
        # Slot -> the channel of its master; None: not known (no map yet, or no master).
        self._owners: list[ScriptChannel | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._addresses: dict[ScriptChannel, Address] = {}
        self._refreshing: asyncio.Future[None] | None = None
        self._refresh_scheduled = False
        self._last_refresh = float("-inf")
        # Resends waiting for a timer or a connection, and background refreshes (strong refs).
        self._background: set[asyncio.Future[Any]] = set()
        self._waiting_resends = 0
        self._closed = False

    def preload(self, script: str) -> None:
        """Load ``script`` (Lua source) on every connect to every node (``ScriptChannel``'s
        ``preload``), a node discovered later included."""
        self._preloaded.append(script)
        for channel in self._nodes.values():
            channel.preload(script)

    def _node(self, address: Address) -> ScriptChannel:
        """The channel to ``address``, made on first use (with the preloaded scripts)."""
        channel = self._nodes.get(address)
        if channel is None:
            host, port = address
            channel = ScriptChannel(
                f"redis://{self._credentials}{host}:{port}/0",
                timeout_s=self._timeout_s,
                name=self._name,
                decode_responses=self.decode_responses,
            )
            for script in self._preloaded:
                channel.preload(script)
            channel.on_redirect = self._redirected
            channel.on_connection_lost = self._map_stale
            self._nodes[address] = channel
            self._addresses[channel] = address
        return channel

    # --- the slot map ---------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the slot map (``CLUSTER SLOTS``) from the first node that answers: the
        masters known, then the node of ``REDIS_URL``. Concurrent calls share one read.

        Raises:
            redis.exceptions.ConnectionError: no node answered.
        """
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._read_slot_map())
            self._refreshing.add_done_callback(self._refreshed)
        await asyncio.shield(self._refreshing)

    def _refreshed(self, refreshing: asyncio.Future[None]) -> None:
        if self._refreshing is refreshing:
            self._refreshing = None

    async def _read_slot_map(self) -> None:
        self._last_refresh = asyncio.get_running_loop().time()
        candidates = dict.fromkeys([*self._addresses_owning_slots(), self._seed])
        last_error: Exception | None = None
        for address in candidates:
            try:
                reply = await self._node(address).execute("CLUSTER", "SLOTS")
            except RedisError as exc:
                last_error = exc
                continue
            self._apply_slot_map(reply, address)
            return
        raise RedisConnectionError(f"no Redis Cluster node answered CLUSTER SLOTS: {last_error}")

    def _addresses_owning_slots(self) -> list[Address]:
        owners = dict.fromkeys(channel for channel in self._owners if channel is not None)
        return [self._addresses[channel] for channel in owners]

    def _apply_slot_map(self, reply: list[Any], asked: Address) -> None:
        """``CLUSTER SLOTS``: ``[[first_slot, last_slot, [host, port, id, ...], replicas...]]``."""
        owners: list[ScriptChannel | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for first, last, master, *_ in reply:
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            channel = self._node((host or asked[0], int(master[1])))
            owners[int(first) : int(last) + 1] = [channel] * (int(last) - int(first) + 1)
        self._owners = owners

    def _map_stale(self) -> None:
        """Have the map read again in the background, at most every
        ``MIN_REFRESH_INTERVAL_S``."""
        if self._refresh_scheduled or self._closed:
            return
        self._refresh_scheduled = True
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_refresh + MIN_REFRESH_INTERVAL_S - loop.time())
        loop.call_later(delay, self._refresh_in_background)

    def _refresh_in_background(self) -> None:
        self._refresh_scheduled = False
        if self._closed:
            return
        self._track(asyncio.ensure_future(self.refresh()), "slot map refresh")

    def _track(self, future: asyncio.Future[Any], what: str) -> None:
        self._background.add(future)
        future.add_done_callback(partial(self._untrack, what))

    def _untrack(self, what: str, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.warning("redis cluster %s failed: %r", what, exc)

    # --- sending --------------------------------------------------------------------------

    async def execute(self, *command: Any) -> Any:
        """Send one command to its slot's master; its reply (as ``ScriptChannel.execute``).

        Raises:
            redis.exceptions.ConnectionError: no map could be read, the slot's master is
                unreachable (the map is read again), dropped or too slow.
            redis.exceptions.ResponseError: Redis answered an error, or still redirected
                after ``MAX_REDIRECTS``.
        """
        reply = self.submit(*command)
        if reply is None:
            channel = await self._connected_owner(command_slot(command))
            reply = channel.submit(*command)
            if reply is None:
                self._map_stale()
                raise RedisConnectionError("redis connection lost before the command was sent")
        return await reply

    async def _connected_owner(self, slot: int) -> ScriptChannel:
        """The slot's master with a live connection, reading the map first if needed.

        Raises:
            redis.exceptions.ConnectionError: no map, no master for the slot, or it is
                unreachable.
        """
        channel = self._owners[slot]
        if channel is None:
            await self.refresh()
            channel = self._owners[slot]
            if channel is None:
                raise RedisConnectionError(f"no Redis Cluster master serves slot {slot}")
        try:
            await channel.connect()
        except RedisConnectionError:
            self._map_stale()
            raise
        return channel

    def submit(self, *command: Any) -> asyncio.Future[Any] | None:
        """As ``ScriptChannel.submit``: the future of the reply (redirects followed), or
        ``None`` when the slot's master has no connection yet (use ``execute``)."""
        channel = self._owners[command_slot(command)]
        return None if channel is None else channel.submit(*command)

    def send(self, *command: Any) -> tuple[asyncio.Future[Any], asyncio.Future[bool]] | None:
        """As ``ScriptChannel.send``: ``(reply, written)``, or ``None`` without a connection
        to the slot's master yet.

        ``written`` is about the first node the command went to: a redirect answers that
        the command did not run there, and the resend is not in the kernel's buffer before
        the redirect's reply came back (docs/design.md, "Redis Cluster").
        """
        channel = self._owners[command_slot(command)]
        return None if channel is None else channel.send(*command)

    def _redirected(
        self,
        future: asyncio.Future[Any],
        command: tuple[Any, ...],
        message: str,
        redirects: int,
        channel: ScriptChannel,
    ) -> None:
        """A node's ``on_redirect``: send ``command`` where the redirect says, its reply to
        resolve ``future`` (the one the caller awaits: no wrapper on the way)."""
        redirect = parse_redirect(message, self._addresses[channel])
        if redirect is None or redirects >= MAX_REDIRECTS:
            future.set_exception(ResponseError(message))
            return
        redirects += 1
        if redirect.address is None:  # TRYAGAIN or CLUSTERDOWN: the owner again, later
            if redirect.kind != "TRYAGAIN":
                self._map_stale()
            delay = min(RETRY_DELAY_S * 2 ** (redirects - 1), MAX_RETRY_DELAY_S)
            self._waiting_resends += 1
            asyncio.get_running_loop().call_later(
                delay, self._resend_to_owner, future, command, redirects
            )
            return
        target = self._node(redirect.address)
        if redirect.kind == _MOVED:
            assert redirect.slot is not None
            self._owners[redirect.slot] = target
            self._map_stale()
        self._resend(future, command, target, redirects, asking=redirect.kind == _ASK)

    def _resend_to_owner(
        self, future: asyncio.Future[Any], command: tuple[Any, ...], redirects: int
    ) -> None:
        self._waiting_resends -= 1
        if future.done():
            return
        if self._closed:
            future.set_exception(RedisConnectionError("redis channel closed"))
            return
        channel = self._owners[command_slot(command)]
        if channel is None:
            self._resend_when_connected(future, command, None, redirects, asking=False)
            return
        self._resend(future, command, channel, redirects, asking=False)

    def _resend(
        self,
        future: asyncio.Future[Any],
        command: tuple[Any, ...],
        channel: ScriptChannel,
        redirects: int,
        *,
        asking: bool,
    ) -> None:
        """Send ``command`` to ``channel`` (after ``ASKING`` when ``asking``: both in this
        iteration's write, so nothing comes between them), its reply into ``future``."""
        if future.done():
            return
        if asking:
            asked = channel.submit("ASKING")
            if asked is None:
                self._resend_when_connected(future, command, channel, redirects, asking=True)
                return
            asked.add_done_callback(_ignore_reply)
        if not channel.resend(future, command, redirects):
            self._resend_when_connected(future, command, channel, redirects, asking=False)

    def _resend_when_connected(
        self,
        future: asyncio.Future[Any],
        command: tuple[Any, ...],
        channel: ScriptChannel | None,
        redirects: int,
        *,
        asking: bool,
    ) -> None:
        """``_resend`` once ``channel`` (None: the slot's owner) has a connection."""

        async def connect_then_resend() -> None:
            try:
                target = channel
                if target is None:
                    target = await self._connected_owner(command_slot(command))
                else:
                    await target.connect()
            except RedisError as exc:
                self._map_stale()
                if not future.done():
                    future.set_exception(exc)
                return
            finally:
                self._waiting_resends -= 1
            self._resend(future, command, target, redirects, asking=asking)

        self._waiting_resends += 1
        self._track(asyncio.ensure_future(connect_then_resend()), "resend")

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script by SHA, loading it on every known node first if the slot's
        master does not know it."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await asyncio.gather(
                *(node.execute("SCRIPT", "LOAD", script) for node in list(self._nodes.values())),
                return_exceptions=True,
            )
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def wait_idle(self) -> None:
        """Wait until every command sent has its final reply or has failed, redirects
        included; at most about ``2 * timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self._timeout_s
        while self._waiting_resends or any(node.busy for node in self._nodes.values()):
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # let the replies' done callbacks run

    async def close(self) -> None:
        """Close every node's connection (commands in flight fail with ConnectionError)."""
        self._closed = True
        for future in list(self._background):
            future.cancel()
        await asyncio.gather(*(node.close() for node in self._nodes.values()))

    @property
    def nodes(self) -> dict[Address, ScriptChannel]:
        """The node channels made so far, by ``(host, port)`` (for tests and diagnostics)."""
        return dict(self._nodes)

    def owner_of(self, slot: int) -> Address | None:
        """The address the map says owns ``slot``; None before the first read."""
        channel = self._owners[slot]
        return None if channel is None else self._addresses[channel]


def _ignore_reply(reply: asyncio.Future[Any]) -> None:
    """Retrieve ``ASKING``'s reply (``OK``; an error shows in the command's own reply)."""
    if not reply.cancelled():
        reply.exception()
