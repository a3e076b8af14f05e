"""Settlements and voids Redis did not confirm, retried in the background until they land.

A delivered answer's settle command may fail after delivery: its reply is lost in a stall
(the script channel drops a connection whose reply is ``timeout_s`` late, and Redis discards
the commands it had not run), a dropped connection, or a Redis that restarted. The gateway
then hands the settlement to this process's ``SettlementRescue``, which sends it again when
Redis answers. ``settle.lua`` is idempotent by request id (a settled marker), so the repeat
is right whether the first command ran or not; in a Redis that restarted empty it appends a
fresh outbox entry, which the poster posts (Postgres keeps one settlement per request id).

When Redis stays unreachable for ``post_after_s``, or the process is stopping, the record is
posted to Postgres directly (``post_settlements``, idempotent per request id; the charge is
capped at the posted balance there); the hold is then released and the cached balance
reloaded once Redis answers.

A hold whose void failed (Redis unreachable) is voided the same way, as soon as Redis
answers, rather than left to its deadline.

What is lost: records still here when the process dies (SIGKILL) or when Postgres also
refuses them at shutdown; each is logged at ERROR with its payload for an operator.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import asyncpg

from billing.errors import POSTGRES_REFUSED_INPUT, POSTGRES_UNAVAILABLE, BillingUnavailableError
from billing.metering.holds import HoldStore
from billing.metering.outbox import posting_row
from billing.metering.posting import post_settlements

log = logging.getLogger(__name__)

#: Seconds a lost settlement is sent to Redis before it is posted to Postgres directly (below
#: ``holds.SETTLED_MARKER_TTL_S``: a repeat in Redis must still find the first's marker).
POST_AFTER_S = 30.0


@dataclass(frozen=True, slots=True)
class LostSettlement:
    """A settle command whose outcome Redis did not confirm; what ``HoldStore.settle`` takes.

    Attributes:
        payload: the ``SettlementRecord`` JSON (``billing.metering.outbox``).
        lost_at: the event loop's time when it was handed over (for ``post_after_s``).
    """

    account_id: int
    request_id: str
    cost_millicredits: int
    payload: str
    lost_at: float


@dataclass(slots=True)
class RescueStats:
    """Counters for metrics and tests: settlements sent again, posted to Postgres directly,
    holds voided, rounds that failed because Redis (or Postgres) was still unreachable."""

    resettled: int = 0
    posted_directly: int = 0
    voided: int = 0
    failures: int = 0


@dataclass(slots=True)
class _Release:
    """A hold to void; ``reload_balance``: the charge was posted to Postgres directly, so the
    cached balance is reloaded first (it would overstate what is available otherwise)."""

    account_id: int
    reload_balance: bool = False


@dataclass(slots=True)
class _Queue:
    settlements: dict[str, LostSettlement] = field(default_factory=dict)
    releases: dict[str, _Release] = field(default_factory=dict)


class SettlementRescue:
    """One per gateway process: settle again, or void, what Redis did not confirm.

    Args:
        holds: the store whose ``settle`` and ``void`` are retried.
        pool: Postgres, for records posted directly.
        retry_interval_s: the first wait after a failed round; doubled up to
            ``max_retry_interval_s`` while Redis stays unreachable.
        post_after_s: a settlement Redis has not taken for this long is posted to Postgres.
    """

    def __init__(
        self,
        holds: HoldStore,
        pool: asyncpg.Pool,
        *,
        retry_interval_s: float = 0.2,
        max_retry_interval_s: float = 5.0,
        post_after_s: float = POST_AFTER_S,
    ) -> None:
        self._holds = holds
        self._pool = pool
        self._retry_interval_s = retry_interval_s
        self._max_retry_interval_s = max_retry_interval_s
        self._post_after_s = post_after_s
        self._queue = _Queue()
        self._wake = asyncio.Event()
        self.stats = RescueStats()

    @property
    def outstanding(self) -> int:
        """Settlements and voids still waiting."""
        return len(self._queue.settlements) + len(self._queue.releases)

    def settle_later(
        self, account_id: int, *, request_id: str, cost_millicredits: int, payload: str
    ) -> None:
        """Hand over a settle whose reply was lost; it is sent again in the background."""
        self._queue.settlements[request_id] = LostSettlement(
            account_id,
            request_id,
            cost_millicredits,
            payload,
            asyncio.get_running_loop().time(),
        )
        self._wake.set()

    def void_later(self, account_id: int, *, request_id: str) -> None:
        """Hand over a hold whose void failed; it is voided as soon as Redis answers."""
        self._queue.releases.setdefault(request_id, _Release(account_id))
        self._wake.set()

    async def run(self) -> None:
        """Until cancelled: wait for work, then retry it, backing off while Redis fails."""
        interval_s = self._retry_interval_s
        while True:
            if not self.outstanding:
                self._wake.clear()
                await self._wake.wait()
            try:
                await self.retry_once()
            except BillingUnavailableError as exc:
                self.stats.failures += 1
                log.warning(
                    "settlement rescue: %d settlements and %d voids wait for Redis (%s); "
                    "retrying in %.1fs",
                    len(self._queue.settlements),
                    len(self._queue.releases),
                    exc,
                    interval_s,
                )
                await self._post_overdue()
                await asyncio.sleep(interval_s)
                interval_s = min(interval_s * 2, self._max_retry_interval_s)
            else:
                interval_s = self._retry_interval_s

    async def retry_once(self) -> None:
        """Send every waiting settlement again, then void every waiting hold.

        Raises:
            BillingUnavailableError: Redis still unreachable or stalled; what is not done
                stays queued.
        """
        settlements = self._queue.settlements
        for request_id, lost in list(settlements.items()):
            settled = await self._holds.settle(
                lost.account_id,
                request_id=request_id,
                cost_millicredits=lost.cost_millicredits,
                payload=lost.payload,
            )
            settlements.pop(request_id, None)
            self.stats.resettled += 1
            log.info(
                "settlement of %s sent again: charged %d mc (outbox entry %s)",
                request_id,
                settled.charged_millicredits,
                settled.outbox_entry_id,
            )
        releases = self._queue.releases
        for request_id, release in list(releases.items()):
            if release.reload_balance:
                await self._holds.reload_balance(release.account_id)
            released = await self._holds.void(release.account_id, request_id=request_id)
            releases.pop(request_id, None)
            self.stats.voided += 1
            log.info("hold of %s voided after a failure (%d mc released)", request_id, released)

    async def _post_overdue(self) -> None:
        """Post to Postgres the settlements Redis has not taken for ``post_after_s``."""
        now = asyncio.get_running_loop().time()
        overdue = [
            lost
            for lost in self._queue.settlements.values()
            if now - lost.lost_at >= self._post_after_s
        ]
        if overdue:
            await self.post_directly(overdue)

    async def post_directly(self, settlements: list[LostSettlement]) -> bool:
        """Post ``settlements`` to Postgres in one statement (idempotent per request id), and
        queue their holds for release; True when posted. Postgres unreachable: logged, they
        stay queued for Redis."""
        if not settlements:
            return True
        rows = [
            posting_row(s.payload, charged_millicredits=s.cost_millicredits) for s in settlements
        ]
        try:
            async with self._pool.acquire() as conn:
                await post_settlements(conn, "[" + ",".join(rows) + "]")
        except (*POSTGRES_UNAVAILABLE, *POSTGRES_REFUSED_INPUT) as exc:
            # Refused data stays queued for Redis too: the poster dead-letters it from there.
            self.stats.failures += 1
            log.warning("settlement rescue: not posted to Postgres directly (%s)", exc)
            return False
        for lost in settlements:
            self._queue.settlements.pop(lost.request_id, None)
            self._queue.releases[lost.request_id] = _Release(lost.account_id, reload_balance=True)
            self.stats.posted_directly += 1
            log.warning("settlement of %s posted to Postgres directly", lost.request_id)
        return True

    async def finish(self, timeout_s: float) -> None:
        """At shutdown: one last round within ``timeout_s``; settlements Redis still did not
        take are posted to Postgres. What is left then is logged at ERROR (with payloads)."""
        try:
            await asyncio.wait_for(self.retry_once(), timeout_s)
        except (BillingUnavailableError, TimeoutError) as exc:
            log.warning("settlement rescue at shutdown: Redis unavailable (%s)", exc)
        await self.post_directly(list(self._queue.settlements.values()))
        for lost in self._queue.settlements.values():
            log.error("settlement of %s lost at shutdown: %s", lost.request_id, lost.payload)
        for request_id in self._queue.releases:
            log.warning("hold of %s left to expire at its deadline", request_id)
