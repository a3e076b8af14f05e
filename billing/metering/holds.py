"""Holds (reservations) on account balances, kept in Redis and changed only by Lua scripts.

The keys (``billing.metering.redis_keys``, the one home of the layout), per account under
its shard's hash tag, so one Redis Cluster slot with its shard's deadline index and outbox:
    account                     hash ``bal`` (posted balance at ``ver``), ``ver``, ``held``
                                (sum of open holds), ``pending`` (settled, not yet posted to
                                Postgres), ``shortfall`` (outstanding; stops paid use)
    holds                       hash ``request_id -> hold value`` (below)
    spend:d:<YYYYMMDD>, spend:m:<YYYYMM>  hashes ``a`` (the account's spend in that UTC day
                                / month) and ``k:<key_id>`` (a key's), in mc: the holds of
                                requests that started in the window plus the charges of those
                                settled. Created only from Postgres (``load_spend.lua``), when
                                a cap needs one that is missing; from then on every hold of the
                                account counts in them. They expire a day after their window.
    settled:R                   string ``"charged_mc:hold_mc:entry_id"``: request R was
                                settled (a repeat answers this); expires after
                                ``settled_marker_ttl_s``
Per shard: the deadline index (zset of ``"N|request_id"`` by deadline, for the sweeper) and
the settlement outbox stream (see ``billing.metering.posting``).

A hold's value: ``"amount_mc:deadline_ms:day:month:key_id:counted"``: ``day``
(``20261203``) and ``month`` (``202612``) are the UTC windows its request started in,
``key_id`` its API key (0: none), ``counted`` four ``0``/``1`` flags, whether the amount was
added to the day's account field, the day's key field, the month's account field, the month's
key field (those that existed then). Void and expiry take the amount off what it counted;
settle moves those by ``charged - amount`` and adds the charge to fields loaded since. One
reader and writer in Lua, ``lua/hold_value.lua`` (prepended to the scripts that use it), one
in Python, ``parse_hold_value``. The older ``"amount_mc:deadline_ms"`` is read as counting
nothing.

``available = bal - held - pending``; a hold is placed only when ``available >= amount``,
so no balance can go below zero; and only when no spend cap of the key or the account would
be passed (``billing.spend_controls``). Source: two-phase transfers as in TigerBeetle
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
    SpendCapExceededError,
)
from billing.ledger import PostedBalance
from billing.metering.redis_keys import (
    account_key,
    deadlines_key,
    deadlines_keys,
    holds_key,
    outbox_key,
    settled_key,
    shard_of,
    spend_key,
)
from billing.metering.script_channel import PipelinedChannel
from billing.spend_controls import COUNTER_CAPS, SpendWindows, WindowCaps, spend_windows

log = logging.getLogger(__name__)

#: How long a settled request's marker lives: the window in which a repeat of its settle (a
#: reply lost in a stall, sent again by the gateway's rescue) is recognised and changes nothing.
#: Longer than the rescue goes on sending a settle to Redis (``rescue.POST_AFTER_S``, then
#: it posts to Postgres), with room for its retry waits; one key per settlement lives this long.
SETTLED_MARKER_TTL_S = 120.0


#: How long a window's spend counters outlive it: a request settles in the window it started
#: in, up to its hold's deadline (and the rescue's retries) later.
SPEND_COUNTER_GRACE_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class HoldValue:
    """A hold as the holds hash stores it (see the module docstring).

    Attributes:
        counted: which spend counter fields counted the amount: (day account, day key,
            month account, month key); all False for the older form.
    """

    amount_millicredits: int
    deadline_ms: int
    day_id: str | None = None
    month_id: str | None = None
    api_key_id: int | None = None
    counted: tuple[bool, bool, bool, bool] = (False, False, False, False)


def parse_hold_value(value: str) -> HoldValue:
    """Read a holds hash value (as ``lua/hold_value.lua``'s ``hold_parse``).

    Raises:
        ValueError: not a hold value.
    """
    parts = value.split(":")
    if len(parts) == 2:
        return HoldValue(int(parts[0]), int(parts[1]))
    amount, deadline, day, month, key, counted = parts
    flags = tuple(c == "1" for c in counted)
    if len(flags) != 4 or not set(counted) <= {"0", "1"}:
        raise ValueError(f"not a hold value: {value!r}")
    return HoldValue(int(amount), int(deadline), day, month, int(key), flags)


SpendLoader = Callable[[int, int, SpendWindows], Awaitable[tuple[int, int, int, int]]]
"""``(account_id, api_key_id, windows) -> sums`` of posted charges in the windows, in
``COUNTER_CAPS`` order (``billing.spend_controls.window_spend``)."""


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


def load_hold_script(name: str) -> str:
    """``load_script(name)`` after ``hold_value.lua``, the one reader and writer of a hold's
    value in Lua (the scripts that read holds call its functions)."""
    return load_script("hold_value.lua") + load_script(name)


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


def _refusal(
    result: Any, account_id: int, amount_millicredits: int, windows: SpendWindows
) -> Exception:
    """The error for a refusing answer of ``reserve.lua``."""
    status = result[0]
    if status == "INSUFFICIENT":
        return InsufficientCreditsError(
            required_millicredits=amount_millicredits,
            available_millicredits=max(int(result[1]), 0),
        )
    if status == "SUSPENDED":
        return AccountSuspendedError(account_id=account_id, shortfall_millicredits=int(result[1]))
    if status == "CAP":
        cap = COUNTER_CAPS[int(result[1]) - 1]
        return SpendCapExceededError(
            cap=cap,
            cap_millicredits=int(result[2]),
            spent_millicredits=int(result[3]),
            required_millicredits=amount_millicredits,
            resets_at_ms=windows.resets_at_ms(cap),
        )
    return BillingUnavailableError(f"reserve: unexpected answer {result!r}")


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
        channel: PipelinedChannel | None = None,
        settled_marker_ttl_s: float = SETTLED_MARKER_TTL_S,
        load_spend: SpendLoader | None = None,
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
            load_spend: reads a window's posted spend from Postgres, for a spend cap whose
                counters Redis has not got (``billing.spend_controls.window_spend``); without
                it a capped reserve fails closed (``BillingUnavailableError``).
        """
        self._redis = redis
        self._settled_marker_ttl_ms = int(settled_marker_ttl_s * 1000)
        self._channel = channel
        self._load_balance = load_balance
        self._load_spend = load_spend
        self._reserve = redis.register_script(load_hold_script("reserve.lua"))
        self._settle = redis.register_script(load_hold_script("settle.lua"))
        if channel is not None:
            channel.preload(str(self._reserve.script))
            channel.preload(str(self._settle.script))
        self._void = redis.register_script(load_hold_script("void.lua"))
        self._load_spend_script = redis.register_script(load_script("load_spend.lua"))
        self._apply_balance = redis.register_script(load_script("apply_balance.lua"))
        self._ack_posted = redis.register_script(load_script("ack_posted.lua"))
        if channel is not None:
            channel.preload(str(self._ack_posted.script))
        self.settlements_appended = asyncio.Event()
        """Set by every settle sent: this process's poster, idle, wakes on it (it clears it
        before each read) rather than polling every shard's stream at a short interval."""

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
        self,
        account_id: int,
        amount_millicredits: int,
        *,
        request_id: str,
        ttl_s: float = 900,
        api_key_id: int = 0,
        started_ms: int | None = None,
        window_caps: WindowCaps | None = None,
    ) -> int:
        """Place a hold on an account's available balance, within its spend caps.

        Args:
            amount_millicredits: upper-bound cost of the request; >= 0.
            request_id: idempotency key; a repeat keeps the existing hold.
            ttl_s: seconds until an unsettled hold is voided by the sweeper.
            api_key_id: the request's key (its spend counter field); 0: none.
            started_ms: when the request started (Unix ms; default now): its spend windows.
            window_caps: the day and month caps that apply (``SpendControls.window_caps``);
                None: none (the hold still counts in the counters that exist).

        Returns:
            The available balance after the hold, in millicredits.

        Raises:
            InsufficientCreditsError: available < amount (the gateway answers 402).
            AccountSuspendedError: the account has an outstanding shortfall (402).
            SpendCapExceededError: a cap would be passed (402); nothing written.
            BillingUnavailableError: Redis or Postgres unreachable (503).
        """
        now_ms = int(time.time() * 1000)
        windows = spend_windows(now_ms if started_ms is None else started_ms)
        keys = [
            account_key(account_id),
            holds_key(account_id),
            deadlines_key(shard_of(account_id)),
            spend_key(account_id, "d", windows.day_id),
            spend_key(account_id, "m", windows.month_id),
        ]
        args: list[Any] = [
            request_id,
            amount_millicredits,
            now_ms + int(ttl_s * 1000),
            _member(account_id, request_id),
            now_ms,
            windows.day_id,
            windows.month_id,
            api_key_id,
        ]
        if window_caps is not None:
            args.extend("" if cap is None else cap for cap in window_caps)
        try:
            try:
                result = await self._call(self._reserve, keys, args)
            except NoScriptError:
                result = await self._run(self._reserve, keys, args)
            if result[0] == "LOAD":
                await self._load_into_redis(account_id)
                result = await self._run(self._reserve, keys, args)
            if result[0] == "LOAD_SPEND":
                await self._load_spend_into_redis(account_id, api_key_id, windows, keys[3:])
                result = await self._run(self._reserve, keys, args)
        except RedisError as exc:
            raise BillingUnavailableError(f"redis: {exc}") from exc
        status = result[0]
        if status == "OK":
            return int(result[1])
        raise _refusal(result, account_id, amount_millicredits, windows)

    async def _load_spend_into_redis(
        self, account_id: int, api_key_id: int, windows: SpendWindows, keys: list[str]
    ) -> None:
        """Create the missing spend counter fields of the windows from Postgres.

        Raises:
            RedisError: Redis unreachable.
            BillingUnavailableError: Postgres unreachable, or no loader.
        """
        if self._load_spend is None:
            raise BillingUnavailableError("spend counters missing and no loader")
        sums = await self._load_spend(account_id, api_key_id, windows)
        await self._load_spend_script(
            keys,
            [
                f"k:{api_key_id}",
                *sums,
                windows.day_reset_ms + SPEND_COUNTER_GRACE_MS,
                windows.month_reset_ms + SPEND_COUNTER_GRACE_MS,
            ],
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
        shard = shard_of(account_id)
        keys = [
            account_key(account_id),
            holds_key(account_id),
            deadlines_key(shard),
            outbox_key(shard),
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
        self.settlements_appended.set()

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
            [account_key(account_id), outbox_key(shard_of(account_id))],
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
                [
                    account_key(account_id),
                    holds_key(account_id),
                    deadlines_key(shard_of(account_id)),
                ],
                args,
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
        """Void holds whose deadline has passed (a crashed gateway's), on every shard; returns
        how many.

        Args:
            limit: at most this many expired holds per shard in one call (the sweeper comes
                back next round for the rest).

        Raises:
            BillingUnavailableError: Redis unreachable (the sweeper retries next round).
        """
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        try:
            # One command per shard (each names one slot's key), in one round trip.
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in deadlines_keys():
                    pipe.zrangebyscore(key, "-inf", now_ms, 0, limit)
                by_shard: list[Any] = await pipe.execute()
        except RedisError as exc:
            raise BillingUnavailableError(f"redis: {exc}") from exc
        voided = 0
        for shard, members in enumerate(by_shard):
            for member in members:
                voided += await self._void_expired(shard, member, now_ms)
        return voided

    async def _void_expired(self, shard: int, member: str, now_ms: int) -> int:
        """Void the hold a shard's deadline index member names, if it expired; 1 if voided.

        A member that names no hold of this shard (not ``"<account id>|<request id>"``, or an
        account of another shard) is removed (``_drop_unreadable_deadline``).

        Raises:
            BillingUnavailableError: Redis unreachable.
        """
        account, _, request_id = member.partition("|")
        if not (account.isdigit() and request_id and shard_of(int(account)) == shard):
            await self._drop_unreadable_deadline(shard, member)
            return 0
        if not await self.void(int(account), request_id=request_id, expired_before_ms=now_ms):
            return 0
        log.info(
            "hold %s of account %s expired; voided",
            request_id,
            account,
            extra={"event": "hold.expired", "requestId": request_id, "accountId": int(account)},
        )
        return 1

    async def _drop_unreadable_deadline(self, shard: int, member: str) -> None:
        """Remove a member of a shard's deadline index that names no hold there (not
        ``"<account id>|<request id>"`` of an account of the shard): no hold can be found
        through it, and left in place it would come back first in every sweep. Logged at
        ERROR for an operator.

        Raises:
            BillingUnavailableError: Redis unreachable.
        """
        log.error("hold deadline index member %.200r names no hold; removed", member)
        try:
            await self._redis.zrem(deadlines_key(shard), member)
        except RedisError as exc:
            raise BillingUnavailableError(f"redis: {exc}") from exc
