"""Fleet-wide leases: work that one process of the fleet does at a time (the hold sweeper).

A ``Lease`` is a PostgreSQL session-level advisory lock held on a connection of its own
(``pg_try_advisory_lock(LEASE_LOCK_CLASS, crc32(name))``). Whoever holds it does the leased
work; the others ask again every round and take over as soon as it is free.

Why an advisory lock and not a Redis ``SET NX PX`` lease: the lock belongs to the holder's
session, so it is released the moment that session ends: a holder that exits, crashes or is
killed (its socket is closed by the kernel) hands over at the next round of another process,
with no expiry time to choose, no renewal to miss and no clock involved. What it costs: one
idle Postgres connection per process. A holder cut off from Postgres (a partition) may keep
believing it holds the lock until its connection fails; each round therefore checks the
connection first (``held()`` runs a statement on it), and the leased work must be safe to run
twice at once for that short window (the sweeper is: voiding an expired hold is idempotent).
Work that must go on while Postgres is down (the sweeper needs only Redis) asks ``leased`` to
run in every process then (``run_when_unreachable``).

Source: PostgreSQL's advisory locks (docs: "Advisory Locks"); the two-key form keeps leases
apart from the single-key locks of the migrator and the daily reconciliation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import zlib
from collections.abc import Awaitable, Callable

import asyncpg

from billing.errors import POSTGRES_UNAVAILABLE

log = logging.getLogger(__name__)

#: The first key of every lease's advisory lock (``"leas"``); the second is ``lease_key(name)``.
LEASE_LOCK_CLASS = 0x6C656173


def lease_key(name: str) -> int:
    """The lock's second key for the lease ``name``: its CRC-32 as a signed 32-bit int."""
    return int.from_bytes(zlib.crc32(name.encode()).to_bytes(4, "big"), "big", signed=True)


class Lease:
    """One process's claim on the fleet-wide lease ``name``.

    Attributes:
        name: the lease's name (``hold-sweeper``); one lock per name and database.
        holding: whether this process held it at its last ``held()``.
        reachable: whether Postgres answered at the last ``held()`` (False: nobody can know
            who holds the lease now).
    """

    def __init__(self, database_url: str, name: str, *, timeout_s: float = 5.0) -> None:
        """Args:
        timeout_s: seconds to connect, and for each statement on the lease's connection.
        """
        self.name = name
        self.holding = False
        self.reachable = True
        self._database_url = database_url
        self._timeout_s = timeout_s
        self._key = lease_key(name)
        self._conn: asyncpg.Connection | None = None

    @property
    def application_name(self) -> str:
        """The lease connection's ``application_name``: who holds the lock, as
        ``pg_stat_activity`` shows it (``creditgate-lease hold-sweeper pid 4242 on host``)."""
        return f"creditgate-lease {self.name} pid {os.getpid()} on {socket.gethostname()}"[:63]

    async def held(self) -> bool:
        """Whether this process holds the lease now: asks for it when it does not, checks its
        connection when it does (one round trip either way).

        Postgres unreachable, or the connection lost: False (the lock died with the session,
        another process may hold it now), logged when the lease is lost; the next call
        connects again.
        """
        try:
            conn = self._conn
            if conn is None or conn.is_closed():
                conn = self._conn = await asyncpg.connect(
                    self._database_url,
                    timeout=self._timeout_s,
                    server_settings={"application_name": self.application_name},
                )
                self.holding = False
            if self.holding:
                await conn.fetchval("SELECT 1", timeout=self._timeout_s)
            else:
                self.holding = await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    LEASE_LOCK_CLASS,
                    self._key,
                    timeout=self._timeout_s,
                )
                if self.holding:
                    log.info("lease %s acquired", self.name)
        except POSTGRES_UNAVAILABLE as exc:
            if self.holding or self.reachable:
                log.warning("lease %s: Postgres unreachable, not held: %r", self.name, exc)
            self.holding = self.reachable = False
            await self._drop()
            return False
        self.reachable = True
        return self.holding

    async def close(self) -> None:
        """Release the lease so another process takes it at its next round (unlocked, then the
        session closed; Postgres unreachable: the session's end releases it)."""
        conn = self._conn
        if self.holding and conn is not None and not conn.is_closed():
            with contextlib.suppress(*POSTGRES_UNAVAILABLE):
                await conn.execute(
                    "SELECT pg_advisory_unlock($1, $2)",
                    LEASE_LOCK_CLASS,
                    self._key,
                    timeout=self._timeout_s,
                )
            log.info("lease %s released", self.name)
        self.holding = False
        await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()


def leased(
    lease: Lease, step: Callable[[], Awaitable[None]], *, run_when_unreachable: bool = False
) -> Callable[[], Awaitable[None]]:
    """``step`` run only in the process that holds ``lease`` (a round elsewhere does nothing
    but ask for the lease).

    Args:
        run_when_unreachable: also run ``step`` while Postgres is unreachable (then in every
            process): for work that is safe to run twice at once and must not stop with
            Postgres (the hold sweeper needs only Redis).
    """

    async def run_if_held() -> None:
        if await lease.held() or (run_when_unreachable and not lease.reachable):
            await step()

    return run_if_held
