"""The control listener: each service's ear for operators' changes (``billing.control``).

One ``ControlListener`` per application (the gateway and the admin service each have one,
``runtime.resources.control_ctx``) keeps:

- ``flags``: the live flags (``billing.live_flags.LiveFlags``), an immutable snapshot the hot
  path reads with one attribute access and no await; replaced whole on each re-read.
- a dedicated asyncpg connection that ``LISTEN``s on ``CONTROL_CHANNEL``. An event queues
  its kind and wakes the loop, which runs the reactions registered for it (``react``): the
  gateway drops its cached keys on ``KEYS`` and ``ACCOUNTS`` and reloads its rate cards on
  ``RATE_CARDS``; ``FLAGS`` re-reads the flags.

The safety net, for events that never arrive: the flags are re-read every
``CONTROL_REFRESH_S`` (default 1 s) whatever happens, through the service's pool. An event
is lost only while the listening connection is down, so on every (re)connect every kind's
reactions run (as if each kind had been notified), and on every tick while it is down the
``KEYS`` and ``ACCOUNTS`` reactions run: the gateway then drops its cached keys every tick, so a
revoked key is looked up again (and refused) within ``CONTROL_REFRESH_S`` whatever
``AUTH_CACHE_TTL_S`` is. A reconnect is tried on every tick.

Postgres down: the flags in use stay (logged once per outage), requests never wait for the
listener; keys are then looked up through the pool as without a cache (503 while Postgres
is down, as the auth cache's own expiry gives today).

Delays: a flag flip, a revoked key or a suspended account takes effect on a process within
the NOTIFY's delivery plus one query (milliseconds) when the listener is connected, and
within ``CONTROL_REFRESH_S`` plus one query when it is not (docs/design.md, "Admin API
and live control").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg
import orjson

from billing.control import CONTROL_CHANNEL, ControlKind
from billing.errors import POSTGRES_UNAVAILABLE
from billing.live_flags import LiveFlags, load_flags

log = logging.getLogger(__name__)

Reaction = Callable[[], Awaitable[None]]
"""What a process does when an event of a kind arrives (or may have been missed)."""

_MISSED_WHILE_DOWN = frozenset({ControlKind.KEYS, ControlKind.ACCOUNTS})


class ControlListener:
    """The live flags and the reactions to control events of one application.

    Attributes:
        flags: the current live flags; read it once per request and keep that snapshot.
    """

    def __init__(
        self,
        database_url: str,
        pool: asyncpg.Pool,
        initial: LiveFlags,
        *,
        refresh_s: float = 1.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        """
        Args:
            database_url: where the listening connection connects (the pool's database).
            pool: what the flags are read through.
            initial: the environment's flags (``Settings.initial_flags()``), in force until
                the first read and for every flag the table does not override.
            refresh_s: seconds between the periodic re-reads and reconnect attempts.
            connect_timeout_s: the listening connection's connect timeout.
        """
        self.flags = initial
        self._initial = initial
        self._database_url = database_url
        self._pool = pool
        self._refresh_s = refresh_s
        self._connect_timeout_s = connect_timeout_s
        self._reactions: dict[ControlKind, list[Reaction]] = {}
        self._pending: set[ControlKind] = set()
        self._wake = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._flags_failing = False
        self._listen_failing = False

    @property
    def connected(self) -> bool:
        """The listening connection is up (events arrive as they are sent)."""
        return self._conn is not None and not self._conn.is_closed()

    def react(self, kind: ControlKind, reaction: Reaction) -> None:
        """Run ``reaction()`` on each event of ``kind`` (and whenever one may have been
        missed, see the module docstring). A reaction that raises is logged; the others run."""
        self._reactions.setdefault(kind, []).append(reaction)

    async def refresh_flags(self) -> None:
        """Re-read the flags now. Postgres unreachable: the flags in use stay (a warning,
        once per outage)."""
        try:
            flags = await load_flags(self._pool, self._initial)
        except POSTGRES_UNAVAILABLE as exc:
            if not self._flags_failing:
                log.warning("control: cannot read the flags (those in use stay): %r", exc)
            self._flags_failing = True
            return
        if self._flags_failing:
            log.info("control: flags read again")
        self._flags_failing = False
        if flags != self.flags:
            log.info("control: live flags now %s", flags)
        self.flags = flags

    async def run(self) -> None:
        """Listen, react and re-read until cancelled (run it under ``supervise``)."""
        try:
            while True:
                if not self.connected:
                    await self._connect()
                self._wake.clear()
                await self._react()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._refresh_s)
        finally:
            await self._disconnect()

    async def _connect(self) -> None:
        """Open the listening connection; whether or not it opens, queue what may have been
        missed while it was down."""
        self._conn = None
        try:
            conn = await asyncpg.connect(self._database_url, timeout=self._connect_timeout_s)
        except POSTGRES_UNAVAILABLE as exc:
            self._pending.update(_MISSED_WHILE_DOWN)
            if not self._listen_failing:
                log.warning("control: listener cannot connect (retried every tick): %r", exc)
            self._listen_failing = True
            return
        self._conn = conn  # from here on, closed by _disconnect (even when cancelled)
        conn.add_termination_listener(self._terminated)
        try:
            await conn.add_listener(CONTROL_CHANNEL, self._notified)
        except POSTGRES_UNAVAILABLE as exc:
            await self._disconnect()
            self._pending.update(_MISSED_WHILE_DOWN)
            log.warning("control: LISTEN failed: %r", exc)
            return
        if self._listen_failing:
            log.info("control: listener connected again")
        self._listen_failing = False
        self._pending.update(ControlKind)  # events sent while it was down are lost

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), timeout=2)
        except (TimeoutError, *POSTGRES_UNAVAILABLE):
            pass  # terminated below
        finally:  # also when cancelled mid-close: never leave the connection open
            if not conn.is_closed():
                conn.terminate()

    async def _react(self) -> None:
        """Re-read the flags (every tick) and run the reactions of every queued kind."""
        kinds, self._pending = self._pending, set()
        await self.refresh_flags()
        for kind in kinds:
            for reaction in self._reactions.get(kind, ()):
                try:
                    await reaction()
                except Exception:  # one failing reaction must not stop the others
                    log.exception("control: reaction to %s failed", kind.value)

    def _notified(self, conn: asyncpg.Connection, pid: int, channel: str, payload: str) -> None:
        try:
            kind = ControlKind(orjson.loads(payload)["kind"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("control: unreadable event %r ignored", payload)
            return
        self._pending.add(kind)
        self._wake.set()

    def _terminated(self, conn: asyncpg.Connection) -> None:
        if conn is self._conn:
            log.warning("control: listener connection lost; reconnecting")
            self._conn = None
            self._pending.update(_MISSED_WHILE_DOWN)
            self._wake.set()
