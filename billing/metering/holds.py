"""Holds (reservations) on account balances, kept in Redis and changed only by Lua scripts.

Per account (one hash tag, so one Redis Cluster slot):
    ``cg:v1:{acct:N}:account``  hash ``bal`` (posted balance at ``ver``), ``ver``, ``held``
                                (sum of open holds), ``pending`` (settled, not yet posted to
                                Postgres), ``shortfall`` (outstanding; stops paid use)
    ``cg:v1:{acct:N}:holds``    hash ``request_id -> "amount_mc:deadline_ms"``
    ``cg:v1:{acct:N}:settled:R`` string ``"charged_mc:hold_mc:entry_id"``: request R was
                                settled (a repeat answers this); expires after
                                ``settled_marker_ttl_s``
Global:
    ``cg:v1:hold_deadlines``    zset of ``"N|request_id"`` by deadline, for the sweeper
    ``cg:v1:settlements``       the settlement outbox stream (see ``billing.metering.posting``)

``available = bal - held - pending``; a hold is placed only when ``available >= amount``,
so no balance can go below zero. Source: two-phase transfers as in TigerBeetle
(pending -> post | void | expire).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from billing.errors import (
    AccountSuspendedError,
    BillingUnavailableError,
    InsufficientCreditsError,
)
from billing.ledger import PostedBalance
from billing.metering.script_channel import ScriptChannel

log = logging.getLogger(__name__)

KEY_PREFIX = "cg:v1"
DEADLINES_KEY = f"{KEY_PREFIX}:hold_deadlines"
OUTBOX_STREAM_KEY = f"{KEY_PREFIX}:settlements"


def account_key(account_id: int) -> str:
    """Redis key of an account's balance hash."""
    return f"{KEY_PREFIX}:{{acct:{account_id}}}:account"


def holds_key(account_id: int) -> str:
    """Redis key of an account's open holds."""
    return f"{KEY_PREFIX}:{{acct:{account_id}}}:holds"


def settled_key(account_id: int, request_id: str) -> str:
    """Redis key of the marker ``settle.lua`` leaves for a settled request (its idempotency)."""
    return f"{KEY_PREFIX}:{{acct:{account_id}}}:settled:{request_id}"


#: How long a settled request's marker lives: the window in which a repeat of its settle (a
#: reply lost in a stall, sent again by the gateway's rescue) is recognised and changes nothing.
#: Longer than the rescue goes on sending a settle to Redis (``rescue.POST_AFTER_S``, then
#: it posts to Postgres), with room for its retry waits; one key per settlement lives this long.
SETTLED_MARKER_TTL_S = 120.0


def _member(account_id: int, request_id: str) -> str:
    return f"{account_id}|{request_id}"


@dataclass(frozen=True, slots=True)
class Settled:
    """Result of a settlement.

    Attributes:
        charged_millicredits: what was added to ``pending``: the cost, with usage above the
            hold capped at what was available; Postgres posts min(this, balance).
        hold_millicredits: the hold that was released (0 if it was already gone).
        outbox_entry_id: the stream entry the poster will post to Postgres.
    """

    charged_millicredits: int
    hold_millicredits: int
    outbox_entry_id: str


@dataclass(frozen=True, slots=True)
class AccountHolds:
    """Redis's view of an account; ``None`` fields when the balance is not cached."""

    balance_millicredits: int | None
    version: int | None
    held_millicredits: int
    pending_millicredits: int
    shortfall_millicredits: int

    @property
    def available_millicredits(self) -> int | None:
        """bal - held - pending, or None when the balance is not cached."""
        if self.balance_millicredits is None:
            return None
        return self.balance_millicredits - self.held_millicredits - self.pending_millicredits


BalanceLoader = Callable[[int], Awaitable[PostedBalance]]


def load_script(name: str) -> str:
    """The text of ``billing/metering/lua/<name>`` (a script shipped as package data)."""
    return resources.files("billing.metering").joinpath("lua", name).read_text(encoding="utf-8")


class PendingSettlement:
    """A settle script on its way to Redis; ``result()`` reads its reply."""

    __slots__ = ("_reply", "_run", "_written")

    def __init__(
        self,
        reply: asyncio.Future[Any] | None,
        run: Callable[[], Awaitable[Any]],
        *,
        written: asyncio.Future[bool] | None,
    ) -> None:
        self._reply = reply
        self._run = run
        self._written = written

    def in_kernel(self) -> Awaitable[bool]:
        """Resolves True once the command is in the kernel's socket buffer (it reaches Redis
        even if this process dies now); False if that cannot be known: await ``result()``
        before delivering the response then. (A bare future, not a coroutine: one frame less
        on every request.)"""
        if self._written is not None:
            return self._written
        unknown = asyncio.get_running_loop().create_future()
        unknown.set_result(False)
        return unknown

    async def result(self) -> Settled:
        """The settlement's outcome.

        Raises:
            BillingUnavailableError: Redis unreachable or too slow; whether the script ran is
                unknown (send it again: ``settle.lua`` recognises a repeat).
        """
        try:
            if self._reply is None:
                raw = await self._run()
            else:
                try:
                    raw = await self._reply
                except NoScriptError:  # a live SCRIPT FLUSH: it did not run; load and run it
                    raw = await self._run()
        except RedisError as exc:
            raise BillingUnavailableError(f"redis: {exc}") from exc
        return Settled(int(raw[0]), int(raw[1]), raw[2])

    def on_failure(self, report: Callable[[BaseException], None]) -> None:
        """Check the reply in the background (cheaper than a task per request): ``report``
        gets the error if the settlement failed; NOSCRIPT is retried first.

        Only for a settlement ``in_kernel``; one that is not must be awaited.
        """
        if self._reply is None:
            raise RuntimeError("on_failure needs a settlement already sent")
        self._reply.add_done_callback(partial(self._replied, report))

    def _replied(self, report: Callable[[BaseException], None], reply: asyncio.Future[Any]) -> None:
        if reply.cancelled():
            return
        exc = reply.exception()
        if exc is None:
            return
        if not isinstance(exc, NoScriptError):
            report(BillingUnavailableError(f"redis: {exc}"))
            return
        retry = asyncio.ensure_future(self._run())
        _RETRIES.add(retry)
        retry.add_done_callback(partial(_retried, report))


# NOSCRIPT retries of settlements whose replies were read in the background (strong refs).
_RETRIES: set[asyncio.Future[Any]] = set()


def _retried(report: Callable[[BaseException], None], retry: asyncio.Future[Any]) -> None:
    _RETRIES.discard(retry)
    if not retry.cancelled() and (exc := retry.exception()) is not None:
        report(BillingUnavailableError(f"redis: {exc}"))


class HoldStore:
    """Reserve, settle and void holds with one Lua script each.

    Every method raises ``BillingUnavailableError`` when Redis is unreachable: billing fails
    closed and the gateway answers 503.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        load_balance: BalanceLoader,
        *,
        channel: ScriptChannel | None = None,
        settled_marker_ttl_s: float = SETTLED_MARKER_TTL_S,
    ) -> None:
        """Register the scripts (once, at start-up).

        Args:
            redis: a client with ``decode_responses=True``.
            load_balance: reads an account's posted balance from Postgres; called when Redis
                has no cached balance (never read a missing balance as zero).
            channel: a pipelined connection for the hot path's reserve and settle scripts
                (the gateway passes one; other callers use ``redis``).
            settled_marker_ttl_s: how long a repeat of a settle is recognised (see
                ``settle.lua``).
        """
        self._redis = redis
        self._settled_marker_ttl_ms = int(settled_marker_ttl_s * 1000)
        self._channel = channel
        self._load_balance = load_balance
        self._reserve = redis.register_script(load_script("reserve.lua"))
        self._settle = redis.register_script(load_script("settle.lua"))
        if channel is not None:
            channel.preload(str(self._reserve.script))
            channel.preload(str(self._settle.script))
        self._void = redis.register_script(load_script("void.lua"))
        self._apply_balance = redis.register_script(load_script("apply_balance.lua"))
        self._ack_posted = redis.register_script(load_script("ack_posted.lua"))
        if channel is not None:
            channel.preload(str(self._ack_posted.script))

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        if self._channel is not None:
            return await self._channel.evalsha(script.sha, str(script.script), keys, args)
        return await script(keys, args)

    def _call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        """The script's reply. On a connected channel, the reply's bare future: no coroutine
        frames between the caller and the socket (the hot path's reserve); it fails with
        ``NoScriptError`` after a live ``SCRIPT FLUSH``, where ``_run`` loads the script."""
        if self._channel is not None:
            reply = self._channel.submit("EVALSHA", script.sha, len(keys), *keys, *args)
            if reply is not None:
                return reply
        return self._run(script, keys, args)

    async def wait_for_replies(self) -> None:
        """At shutdown: wait until the settle commands in flight on the pipelined channel
        have their replies or have failed, so a failure reaches its ``on_failure`` report
        (``ScriptChannel.wait_idle``). No channel: returns at once."""
        if self._channel is not None:
            await self._channel.wait_idle()

    @property
    def redis(self) -> aioredis.Redis:
        """The Redis client the scripts run on."""
        return self._redis

    async def reserve(
        self, account_id: int, amount_millicredits: int, *, request_id: str, ttl_s: float = 900
    ) -> int:
        """Place a hold on an account's available balance.

        Args:
            amount_millicredits: upper-bound cost of the request; >= 0.
            request_id: idempotency key; a repeat keeps the existing hold.
            ttl_s: seconds until an unsettled hold is voided by the sweeper.

        Returns:
            The available balance after the hold, in millicredits.

        Raises:
            InsufficientCreditsError: available < amount (the gateway answers 402).
            AccountSuspendedError: the account has an outstanding shortfall (402).
            BillingUnavailableError: Redis or Postgres unreachable (503).
        """
        now_ms = int(time.time() * 1000)
        keys = [account_key(account_id), holds_key(account_id), DEADLINES_KEY]
        args = [
            request_id,
            amount_millicredits,
            now_ms + int(ttl_s * 1000),
            _member(account_id, request_id),
            now_ms,
        ]
        try:
            try:
                result = await self._call(self._reserve, keys, args)
            except NoScriptError:
                result = await self._run(self._reserve, keys, args)
            if result[0] == "LOAD":
                await self._load_into_redis(account_id)
                result = await self._run(self._reserve, keys, args)
        except RedisError as exc:
            raise BillingUnavailableError(f"redis: {exc}") from exc
        status = result[0]
        if status == "OK":
            return int(result[1])
        if status == "INSUFFICIENT":
            raise InsufficientCreditsError(
                required_millicredits=amount_millicredits,
                available_millicredits=max(int(result[1]), 0),
            )
        if status == "SUSPENDED":
            raise AccountSuspendedError(
                account_id=account_id, shortfall_millicredits=int(result[1])
            )
        raise BillingUnavailableError(f"reserve: unexpected answer {result!r}")

    async def refuse_uncovered(self, account_id: int, amount_millicredits: int) -> None:
        """Raise what ``reserve`` would for a request that costs at least
        ``amount_millicredits`` and that the account cannot cover; place nothing.

        A cheap check before expensive work (the gateway's count of a large prompt): one
        Redis read, and a load from Postgres when the balance is not cached (as ``reserve``).
        It compares the posted balance less unposted charges (``bal - pending``), ignoring
        open holds, so it never refuses what ``reserve`` would accept (``reserve`` first
        voids holds past their deadline); ``reserve`` still decides.

        Raises:
            InsufficientCreditsError: ``bal - pending < amount_millicredits`` (402); its
                ``available_millicredits`` is ``bal - held - pending``, at least 0.
            AccountSuspendedError: the account has an outstanding shortfall (402).
            BillingUnavailableError: Redis or Postgres unreachable (503).
        """
        try:
            fields: Any = await self._redis.hmget(
                account_key(account_id), ["ver", "bal", "held", "pending", "shortfall"]
            )
            _, bal, held, pending, shortfall = (int(f) if f else 0 for f in fields)
            if fields[0] is None:
                posted = await self._load_into_redis(account_id)
                bal, shortfall = posted.balance_millicredits, posted.shortfall_millicredits
        except RedisError as exc:
            raise BillingUnavailableError(f"redis: {exc}") from exc
        if shortfall > 0:
            raise AccountSuspendedError(account_id=account_id, shortfall_millicredits=shortfall)
        if bal - pending < amount_millicredits:
            raise InsufficientCreditsError(
                required_millicredits=amount_millicredits,
                available_millicredits=max(bal - held - pending, 0),
            )

    async def settle(
        self, account_id: int, *, request_id: str, cost_millicredits: int, payload: str
    ) -> Settled:
        """Release the hold, add the charge to ``pending`` and append to the outbox.

        What the hold covers is charged in full; usage above it is capped at what is
        available, so an overrun never eats another request's hold. Postgres caps at the true
        balance when the poster posts it (the usage event records any shortfall). See
        ``billing/metering/lua/settle.lua`` for why the cap never goes below the hold.

        Args:
            cost_millicredits: the request's charge at the rate card, >= 0.
            payload: the usage record the poster posts to Postgres
                (``billing.metering.outbox.SettlementRecord.to_json``).

        Idempotent by request id: a repeat within ``settled_marker_ttl_s`` returns the first
        settlement and changes nothing (a settle whose reply was lost can be sent again).

        Raises:
            BillingUnavailableError: Redis unreachable or too slow; the script may or may not
                have run (send it again: the repeat is recognised).
        """
        pending = await self.send_settle(
            account_id, request_id=request_id, cost_millicredits=cost_millicredits, payload=payload
        )
        return await pending.result()

    async def send_settle(
        self, account_id: int, *, request_id: str, cost_millicredits: int, payload: str
    ) -> PendingSettlement:
        """Send the settle script (see ``settle``) and return before its reply arrives.

        On the pipelined channel the command goes out with this loop iteration's batch;
        once ``PendingSettlement.in_kernel()`` says True it reaches Redis even if this process
        dies right after, so the caller may deliver the response and read the reply later.

        Raises:
            BillingUnavailableError: Redis unreachable (also from ``PendingSettlement.result``).
        """
        keys = [
            account_key(account_id),
            holds_key(account_id),
            DEADLINES_KEY,
            OUTBOX_STREAM_KEY,
            settled_key(account_id, request_id),
        ]
        args = [
            request_id,
            cost_millicredits,
            _member(account_id, request_id),
            payload,
            account_id,
            self._settled_marker_ttl_ms,
        ]
        script = self._settle

        def run() -> Awaitable[Any]:
            return self._run(script, keys, args)

        sent = None
        if self._channel is not None:
            sent = self._channel.send("EVALSHA", script.sha, len(keys), *keys, *args)
        if sent is None:
            return PendingSettlement(None, run, written=None)
        return PendingSettlement(sent[0], run, written=sent[1])

    async def ack_posted(
        self, account_id: int, posted: PostedBalance, pairs: list[Any], *, group: str
    ) -> int:
        """After the settlement poster's commit: acknowledge an account's outbox entries, take
        their charges off ``pending`` (once per entry) and apply the posted balance.

        Args:
            posted: the account's balance in Postgres after the commit.
            pairs: flat ``[entry_id, charged_mc, entry_id, charged_mc, ...]``.
            group: the outbox's consumer group.

        Returns:
            The millicredits taken off ``pending``.

        Raises:
            redis.exceptions.RedisError: not acknowledged; the poster retries (the repeat is a
                no-op in Postgres).
        """
        released = await self._run(
            self._ack_posted,
            [account_key(account_id), OUTBOX_STREAM_KEY],
            [
                group,
                posted.balance_millicredits,
                posted.version,
                posted.shortfall_millicredits,
                *pairs,
            ],
        )
        return int(released)

    async def void(
        self, account_id: int, *, request_id: str, expired_before_ms: int | None = None
    ) -> int:
        """Release a hold with no charge; returns the millicredits released (0 if none).

        Args:
            expired_before_ms: only void if the hold's deadline is at or before this time
                (the sweeper's guard against voiding a hold that was just renewed).

        Raises:
            BillingUnavailableError: Redis unreachable.
        """
        args: list[Any] = [request_id, _member(account_id, request_id)]
        if expired_before_ms is not None:
            args.append(expired_before_ms)
        try:
            released = await self._void(
                [account_key(account_id), holds_key(account_id), DEADLINES_KEY], args
            )
        except RedisError as exc:
            raise BillingUnavailableError(f"redis: {exc}") from exc
        return int(released)

    async def sync_balance(self, account_id: int, posted: PostedBalance) -> bool:
        """Give Redis a posted (balance, version) pair; applied only if newer.

        Returns:
            True when Redis took it, False when it already had that version or newer.

        Raises:
            RedisError: Redis unreachable (callers that must not fail log and continue:
                the next reserve reloads a missing balance, and versions converge).
        """
        applied = await self._apply_balance(
            [account_key(account_id)],
            [posted.balance_millicredits, posted.version, posted.shortfall_millicredits],
        )
        return bool(applied)

    async def reload_balance(self, account_id: int) -> None:
        """Read the account's posted balance from Postgres and give it to Redis (applied only
        if newer): after a charge was posted without Redis (``SettlementRescue``).

        Raises:
            BillingUnavailableError: Redis or Postgres unreachable.
        """
        try:
            await self._load_into_redis(account_id)
        except RedisError as exc:
            raise BillingUnavailableError(f"redis: {exc}") from exc

    async def _load_into_redis(self, account_id: int) -> PostedBalance:
        """The account's posted balance from Postgres, given to Redis (applied only if newer).

        Raises:
            RedisError: Redis unreachable.
            BillingUnavailableError: Postgres unreachable (``load_balance``).
        """
        posted = await self._load_balance(account_id)
        await self.sync_balance(account_id, posted)
        return posted

    async def account_state(self, account_id: int) -> AccountHolds:
        """Redis's view of an account (for `accounts show` and the admin API).

        Raises:
            BillingUnavailableError: Redis unreachable.
        """
        try:
            bal, ver, held, pending, shortfall = await self._redis.hmget(
                account_key(account_id), ["bal", "ver", "held", "pending", "shortfall"]
            )
        except RedisError as exc:
            raise BillingUnavailableError(f"redis: {exc}") from exc
        return AccountHolds(
            balance_millicredits=int(bal) if bal is not None else None,
            version=int(ver) if ver is not None else None,
            held_millicredits=int(held or 0),
            pending_millicredits=int(pending or 0),
            shortfall_millicredits=int(shortfall or 0),
        )

    async def sweep_expired(self, *, now_ms: int | None = None, limit: int = 500) -> int:
        """Void holds whose deadline has passed (a crashed gateway's); returns how many.

        Raises:
            BillingUnavailableError: Redis unreachable (the sweeper retries next round).
        """
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        try:
            members: Any = await self._redis.zrangebyscore(DEADLINES_KEY, "-inf", now_ms, 0, limit)
        except RedisError as exc:
            raise BillingUnavailableError(f"redis: {exc}") from exc
        voided = 0
        for member in members:
            account, _, request_id = member.partition("|")
            if not (account.isdigit() and request_id):
                await self._drop_unreadable_deadline(member)
                continue
            if await self.void(int(account), request_id=request_id, expired_before_ms=now_ms):
                voided += 1
        return voided

    async def _drop_unreadable_deadline(self, member: str) -> None:
        """Remove a deadline-index member that names no account's hold (not
        ``"<account id>|<request id>"``): no hold can be found through it, and left in place it
        would come back first in every sweep. Logged at ERROR for an operator.

        Raises:
            BillingUnavailableError: Redis unreachable.
        """
        log.error("hold deadline index member %.200r names no hold; removed", member)
        try:
            await self._redis.zrem(DEADLINES_KEY, member)
        except RedisError as exc:
            raise BillingUnavailableError(f"redis: {exc}") from exc
