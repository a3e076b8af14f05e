"""Posting settlements: drains the Redis outbox streams into the Postgres ledger.

The settle script appends each settlement to its account's shard's outbox stream
(``billing.metering.redis_keys.outbox_key``) in the same atomic step that releases its hold,
so a charge survives a gateway crash the moment the script returns. Posters (one per gateway
process, in the consumer group ``settlement-posters`` of every shard's stream) read every
shard (one ``XREADGROUP`` per stream, sent together: a Redis Cluster refuses one command naming
several shards' streams), post what they read with one statement per batch
(``post_settlements``, idempotent by request id; a batch may mix shards), and only then
acknowledge each entry with ``ack_posted.lua``, which also takes the entries' charges off the
account's ``pending`` and applies the new posted balance. Entries of a poster that died are
claimed by the others after ``claim_idle_ms``. Redis down: the poster retries with backoff;
Postgres down: entries stay pending and are retried (nothing lost, nothing doubled). When
every shard is empty the poster waits for a settle of its own process
(``HoldStore.settlements_appended``), or ``idle_s`` for other processes' settles, before it
reads again; after a short read it waits ``linger_s`` to let more gather.

After an upgrade from the v1 layout the poster also drains the old single stream
(``redis_keys.LEGACY_OUTBOX_KEY``) until it is empty, then stops looking at it. Its entries'
charges were never in a v2 ``pending`` (v1 caches are ignored), so acknowledging one only
deletes it and applies the account's posted balance.

An entry Postgres refuses for its data (``POSTGRES_REFUSED_DATA``: a value out of range, an
unknown account) would fail its whole batch on every retry. The poster splits a refused
batch in halves until each refused entry stands alone, posts the rest, and dead-letters each
refused entry, and each entry it cannot read: a row in ``settlement_dead_letters`` first, then
``dead_letter.lua`` acknowledges and deletes the entry and releases its charge from
``pending``. ``creditgate outbox replay`` posts a dead letter once its cause is fixed.

No bad entry stops settlement: the outbox is read as bytes and each entry decoded here, so an
entry that is not UTF-8 is one unreadable entry (its payload stored with its bad bytes escaped,
``\\xff``) instead of a decoding error failing every read. Unreadable too: a missing field, a
charge or account that is not a non-negative 64-bit integer, and a record whose account is not
the entry's (the charge sits in the entry account's ``pending``; posting it to another account
would charge one and never acknowledge the other), and an account whose shard is not the
stream's (its ``pending`` is in another slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import asyncpg
import orjson
from redis.client import NEVER_DECODE
from redis.exceptions import RedisError, ResponseError

from billing.errors import POSTGRES_REFUSED_DATA, POSTGRES_UNAVAILABLE
from billing.ledger import PostedBalance
from billing.metering.holds import HoldStore, load_script
from billing.metering.outbox import STREAM_FIELDS, posting_row
from billing.metering.redis_keys import (
    LEGACY_OUTBOX_KEY,
    SHARDS,
    account_key,
    outbox_key,
    outbox_keys,
    shard_of,
)
from billing.metering.script_channel import PipelinedChannel

log = logging.getLogger(__name__)

GROUP = "settlement-posters"

#: An outbox entry as read: its id and fields, undecoded.
RawEntry = tuple[bytes, dict[bytes, bytes]]
#: What one read of one stream returned: the stream's key and its entries.
StreamRead = tuple[str, list[RawEntry]]

# redis-py's option for a reply left undecoded (what its DUMP uses): a client made with
# decode_responses=True would otherwise fail the whole read on one entry that is not UTF-8.
_UNDECODED: Final = {NEVER_DECODE: True}
_RECORD, _CHARGED, _ACCOUNT = (name.encode() for name in STREAM_FIELDS)


@dataclass(frozen=True, slots=True)
class AccountPosting:
    """What one settlement batch did to one account (``post_settlements``).

    Attributes:
        posted: settlements posted now (a usage event each, a deduction entry if charged).
        duplicates: settlements whose request id was posted before (nothing changed).
        charged_millicredits: sum of what the posted settlements took from the balance.
        balance: the account's balance, version and shortfall after the batch.
    """

    account_id: int
    posted: int
    duplicates: int
    charged_millicredits: int
    balance: PostedBalance


# The SQL function answers per settlement; summed per account in the same statement, the
# poster reads and builds one row per account, not one per settlement. Balance, version and
# shortfall are equal on an account's rows.
_POST_SETTLEMENTS_SQL = """
SELECT out_account_id,
       count(*) FILTER (WHERE out_posted),
       count(*) FILTER (WHERE NOT out_posted),
       coalesce(sum(out_charged_millicredits), 0)::bigint,
       min(out_balance_millicredits), min(out_balance_version), min(out_shortfall_millicredits)
  FROM post_settlements($1::jsonb)
 GROUP BY out_account_id
"""


async def post_settlements(conn: asyncpg.Connection, batch: str) -> list[AccountPosting]:
    """Post a batch of settlements in one statement (so one transaction): a usage event per
    request id, at most once, and its deduction, capped at what the balance still covers.

    Args:
        batch: a JSON array of posting rows (``billing.metering.outbox.posting_row``), read
            by ``migrations/functions/post_settlements.sql``.

    Returns:
        One ``AccountPosting`` per account in the batch.

    Raises:
        asyncpg.PostgresError: nothing was posted (an unknown account, API key or rate card,
            a malformed record). Postgres unreachable: ``POSTGRES_UNAVAILABLE``.
    """
    return [
        AccountPosting(r[0], r[1], r[2], r[3], PostedBalance(r[4], r[5], r[6]))
        for r in await conn.fetch(_POST_SETTLEMENTS_SQL, batch)
    ]


@dataclass(slots=True)
class PosterStats:
    """Counters for metrics: batches and settlements posted, duplicates skipped, failures,
    and outbox entries dead-lettered (``unreadable`` of them because they could not be
    read, the others because Postgres refused their record)."""

    batches: int = 0
    posted: int = 0
    duplicates: int = 0
    failures: int = 0
    unreadable: int = 0
    dead_lettered: int = 0
    charged_millicredits: int = 0
    #: Called with each posted batch's duration in seconds (a metric's ``observe``).
    on_batch: Callable[[float], None] | None = None


class _Posting(NamedTuple):
    """One readable outbox entry on its way to Postgres."""

    stream: str
    entry_id: str
    fields: Mapping[bytes, bytes]
    account_id: int
    charged_millicredits: int
    row: str


_INSERT_DEAD_LETTER_SQL = """
INSERT INTO settlement_dead_letters
    (stream_entry_id, request_id, account_id, charged_millicredits, payload, error)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (stream_entry_id) DO NOTHING
"""

_INT64_MAX = 2**63 - 1
#: Seconds an idle poster woken by a settle waits before it reads: the settle was sent, not yet
#: run (a settle it misses is read after ``idle_s``).
_SENT_TO_RUN_S = 0.002


class SettlementPoster:
    """Posts outbox settlements to Postgres in batches; at-least-once delivery, exactly-once
    effect (usage_events.request_id and ledger idempotency keys are unique)."""

    def __init__(
        self,
        holds: HoldStore,
        pool: asyncpg.Pool,
        *,
        consumer: str,
        batch_size: int = 500,
        claim_idle_ms: int = 30_000,
        linger_s: float = 0.02,
        idle_s: float = 0.05,
        reader: PipelinedChannel | None = None,
        stats: PosterStats | None = None,
    ) -> None:
        """``batch_size``: entries read per stream per read, and per Postgres statement.
        ``linger_s``: the wait after a read that found entries but filled no batch: more
        settlements gather meanwhile. ``idle_s``: the longest wait after a read that found
        none (every shard empty); a settle of this process ends it at once, so ``idle_s``
        bounds the delay only for other processes' settles, and an idle poster reads every
        shard once per ``idle_s``. ``reader``: a connection of its own for the reads of new
        entries, parsed by hiredis (cheaper per settlement than redis-py's stream parsing);
        without it, redis-py reads them. ``stats``: the counters to add to (the process's, for its
        metrics); a new ``PosterStats`` without it."""
        self._holds = holds
        self._redis = holds.redis
        self._reader = reader
        self._pool = pool
        self._consumer = consumer
        self._batch_size = batch_size
        self._claim_idle_ms = claim_idle_ms
        self._linger_s = linger_s
        self._idle_s = idle_s
        self._dead_letter_script = self._redis.register_script(load_script("dead_letter.lua"))
        self.stats = stats if stats is not None else PosterStats()
        # The streams read: every shard's, and the v1 stream until it is found empty.
        self._streams: tuple[str, ...] = (*outbox_keys(), LEGACY_OUTBOX_KEY)

    @property
    def streams(self) -> tuple[str, ...]:
        """The outbox streams this poster reads: every shard's, and the v1 layout's until it
        was found empty (module docstring)."""
        return self._streams

    async def ensure_group(self) -> None:
        """Create every shard's stream and consumer group if missing (idempotent); join the
        v1 stream's group when that stream still exists, else stop looking at it."""
        legacy = LEGACY_OUTBOX_KEY in self._streams
        if legacy and not await self._redis.exists(LEGACY_OUTBOX_KEY):
            self._legacy_drained()
            legacy = False
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in outbox_keys():
                pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
            if legacy:
                pipe.xgroup_create(LEGACY_OUTBOX_KEY, GROUP, id="0")
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, ResponseError) and "BUSYGROUP" not in str(reply):
                raise reply
            if isinstance(reply, Exception) and not isinstance(reply, ResponseError):
                raise reply

    def _legacy_drained(self) -> None:
        if LEGACY_OUTBOX_KEY in self._streams:
            self._streams = outbox_keys()
            log.info("v1 settlement outbox %s is empty; no longer read", LEGACY_OUTBOX_KEY)

    async def run(self) -> None:
        """Loop until cancelled: claim stale entries, read new ones, post them."""
        backoff_s = 0.1
        last_claim = 0.0
        group_ready = False
        while True:
            try:
                if not group_ready:  # at start and after a failure (Redis may have restarted)
                    await self.ensure_group()
                    group_ready = True
                loop_time = asyncio.get_running_loop().time()
                if loop_time - last_claim > self._claim_idle_ms / 2000:
                    last_claim = loop_time
                    await self.claim_stale()
                posted = await self.drain_once()
                backoff_s = 0.1
                if posted == 0:
                    if await self._wait_for_settlements():
                        # Woken as the settle was sent: let it run in Redis before the read.
                        await asyncio.sleep(_SENT_TO_RUN_S)
                elif posted < self._batch_size:
                    # Let a few more settlements gather: one transaction per batch costs the
                    # same CPU whether it holds 1 entry or 100 (Postgres lags by ~linger_s).
                    await asyncio.sleep(self._linger_s)
            except asyncio.CancelledError:
                raise
            except (RedisError, *POSTGRES_UNAVAILABLE) as exc:
                group_ready = False
                self.stats.failures += 1
                if isinstance(exc, TimeoutError):
                    # A statement without an answer (POSTGRES_COMMAND_TIMEOUT_S): the pool's
                    # other connections may be as dead (a network partition swallows them
                    # without a reset). Replace them all rather than wait out each one.
                    await self._pool.expire_connections()
                log.warning("settlement poster: %r; retrying in %.1fs", exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)

    async def _wait_for_settlements(self) -> bool:
        """Every shard was empty: wait until this process sends a settle (True), or
        ``idle_s`` (False)."""
        appended = self._holds.settlements_appended
        if not appended.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._idle_s):
                    await appended.wait()
        return appended.is_set()

    async def drain_once(self) -> int:
        """Read new entries of every stream once (up to ``batch_size`` per stream) and post
        them; returns how many were read (an unreadable one included)."""
        self._holds.settlements_appended.clear()  # a settle from now on is read next time
        streams = self._streams
        if self._reader is not None:
            reads = await self._read_new(self._reader, streams)
        else:
            reads = await self._read_group({stream: ">" for stream in streams})
        if LEGACY_OUTBOX_KEY in streams and not any(s == LEGACY_OUTBOX_KEY for s, _ in reads):
            await self._check_legacy_drained()
        if not reads:
            return 0
        await self._post_reads(reads)
        return sum(len(entries) for _, entries in reads)

    async def _check_legacy_drained(self) -> None:
        """Stop reading the v1 stream once it holds nothing (acknowledged entries are deleted,
        so its length counts what is unposted, another consumer's pending entries included)."""
        if not await self._redis.xlen(LEGACY_OUTBOX_KEY):
            self._legacy_drained()

    async def _read_group(self, after_ids: Mapping[str, bytes | str]) -> list[StreamRead]:
        """XREADGROUP through redis-py, undecoded, one command per stream in one round trip:
        new entries (``after_id`` ``">"``) or this consumer's pending ones after ``after_id``;
        the streams that returned entries."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream, after_id in after_ids.items():
                pipe.execute_command(
                    "XREADGROUP",
                    *("GROUP", GROUP, self._consumer, "COUNT", self._batch_size),
                    *("STREAMS", stream, after_id),
                    **_UNDECODED,
                )
            replies: list[Any] = await pipe.execute()
        return [
            (stream, reply[0][1])
            for stream, reply in zip(after_ids, replies, strict=True)
            if reply and reply[0][1]
        ]

    async def _read_new(self, reader: PipelinedChannel, streams: Sequence[str]) -> list[StreamRead]:
        """XREADGROUP of new entries on ``reader`` (made with ``decode_responses=False``), one
        command per stream, all in one write: ``[(stream, [(entry_id, {field: value})])]``
        for the streams that returned entries."""
        group = ("GROUP", GROUP, self._consumer, "COUNT", self._batch_size)
        commands = [("XREADGROUP", *group, "STREAMS", stream, ">") for stream in streams]
        futures = [reader.submit(*command) for command in commands]
        if any(future is None for future in futures):  # not connected yet: connect first
            for future in futures:
                if future is not None:
                    future.cancel()
            replies = [await reader.execute(*command) for command in commands]
        else:
            replies = await asyncio.gather(*futures)  # type: ignore[arg-type]
        # Each entry's fields come as one flat [name, value, ...] list; pairing them through one
        # iterator makes no slice copies.
        return [
            (
                stream,
                [
                    (entry_id, dict(zip(it := iter(flat), it, strict=True)))
                    for entry_id, flat in reply[0][1]
                ],
            )
            for stream, reply in zip(streams, replies, strict=True)
            if reply and reply[0][1]
        ]

    async def claim_stale(self) -> int:
        """Take over the entries of every stream that another poster read but never
        acknowledged for ``claim_idle_ms`` (it crashed), and post them; returns how many were
        claimed."""
        cursors: dict[str, bytes | str] = dict.fromkeys(self._streams, "0-0")
        claimed = 0
        while cursors:
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream, cursor in cursors.items():
                    pipe.execute_command(
                        "XAUTOCLAIM",
                        *(stream, GROUP, self._consumer, self._claim_idle_ms, cursor),
                        *("COUNT", self._batch_size),
                        **_UNDECODED,
                    )
                replies: list[Any] = await pipe.execute()
            reads: list[StreamRead] = []
            next_cursors: dict[str, bytes | str] = {}
            for stream, reply in zip(cursors, replies, strict=True):
                # An entry deleted while pending comes back without fields (Redis 6.2).
                entries = [e for e in reply[1] if e and e[1]]
                if entries:
                    reads.append((stream, entries))
                    claimed += len(entries)
                if reply[0] not in (b"0-0", "0-0"):
                    next_cursors[stream] = reply[0]
            if reads:
                await self._post_reads(reads)
            cursors = next_cursors
        return claimed

    async def drain_all(self) -> int:
        """Post everything readable now, own pending entries included (for CLI and tests);
        returns how many entries were posted (dead-lettered ones uncounted)."""
        await self.ensure_group()
        dead_lettered_before = self.stats.dead_lettered
        total = 0
        # Entries this consumer read before but did not acknowledge: all of them, a batch at a
        # time per stream (a poster stopped mid-run may own more than one batch).
        after_ids: dict[str, bytes | str] = dict.fromkeys(self._streams, "0")
        while after_ids:
            reads = await self._read_group(after_ids)
            after_ids = {stream: batch[-1][0] for stream, batch in reads}
            # An entry deleted from the stream while still pending comes back without fields.
            live = [(stream, [e for e in batch if e[1]]) for stream, batch in reads]
            live = [(stream, entries) for stream, entries in live if entries]
            if live:
                await self._post_reads(live)
                total += sum(len(entries) for _, entries in live)
        while n := await self.drain_once():
            total += n
        return total - (self.stats.dead_lettered - dead_lettered_before)

    async def post(self, stream: str, entries: list[RawEntry]) -> None:
        """Commit entries read from ``stream`` to Postgres, then acknowledge them per account
        (``_post_reads``)."""
        await self._post_reads([(stream, entries)])

    async def _post_reads(self, reads: Iterable[StreamRead]) -> None:
        """Commit what was read to Postgres, ``batch_size`` entries per statement (shards
        mixed), then acknowledge each batch in Redis per account.

        Args:
            reads: ``[(stream, [(entry_id, {field: value})])]`` as read from the outbox,
                undecoded, with the fields of ``billing.metering.outbox.STREAM_FIELDS``.

        An unreadable entry (see the module docstring), and an entry whose record Postgres
        refuses (``POSTGRES_REFUSED_DATA``), is dead-lettered (``dead_letter``); the rest is
        posted.

        Raises:
            POSTGRES_UNAVAILABLE: what was not committed is not acknowledged; retried.
            RedisError: committed but not acknowledged; the retry is a no-op in Postgres.
        """
        batch: list[_Posting] = []
        for stream, entries in reads:
            for raw_id, fields in entries:
                posting = await self._readable(stream, raw_id, fields)
                if posting is None:
                    continue
                batch.append(posting)
                if len(batch) == self._batch_size:
                    await self._post_isolating(batch)
                    batch = []
        if batch:
            await self._post_isolating(batch)

    async def _readable(
        self, stream: str, raw_id: bytes, fields: dict[bytes, bytes]
    ) -> _Posting | None:
        """The entry on its way to Postgres, or None when it cannot be read (dead-lettered
        then)."""
        entry_id = raw_id.decode()  # Redis writes ids: digits and a dash
        try:
            charged = _int64_field(fields[_CHARGED])
            account_id = _int64_field(fields[_ACCOUNT])
            if stream != LEGACY_OUTBOX_KEY and outbox_key(shard_of(account_id)) != stream:
                raise ValueError(f"account {account_id} is not of the shard of {stream}")
            # UnicodeDecodeError is a ValueError.
            payload = fields[_RECORD].decode()
            row = posting_row(payload, charged_millicredits=charged, account_id=account_id)
        except (ValueError, KeyError, TypeError) as exc:
            self.stats.unreadable += 1
            await self.dead_letter(
                entry_id, fields, f"unreadable outbox entry: {exc}", stream=stream
            )
            return None
        return _Posting(stream, entry_id, fields, account_id, charged, row)

    async def _post_isolating(self, batch: list[_Posting]) -> None:
        """Post ``batch``; when Postgres refuses its data, post each half the same way, so
        each refused entry ends alone and is dead-lettered (a batch of n with one bad entry
        costs about 2 log2(n) statements)."""
        try:
            await self._post_and_ack(batch)
        except POSTGRES_REFUSED_DATA as exc:
            if len(batch) == 1:
                entry = batch[0]
                await self.dead_letter(
                    entry.entry_id,
                    entry.fields,
                    f"{type(exc).__name__}: {exc}",
                    stream=entry.stream,
                )
                return
            middle = len(batch) // 2
            await self._post_isolating(batch[:middle])
            await self._post_isolating(batch[middle:])

    async def _post_and_ack(self, batch: list[_Posting]) -> None:
        """One statement for the batch, then the acknowledgements of its accounts."""
        started = time.monotonic()
        by_account: dict[int, list[Any]] = defaultdict(list)
        legacy: list[str] = []
        for entry in batch:
            if entry.stream == LEGACY_OUTBOX_KEY:
                legacy.append(entry.entry_id)
            else:
                by_account[entry.account_id].extend((entry.entry_id, entry.charged_millicredits))
        async with self._pool.acquire() as conn:
            postings = await post_settlements(conn, "[" + ",".join([e.row for e in batch]) + "]")
        # On the gateway's pipelined channel every account's ack goes out in one write.
        acks: list[Coroutine[Any, Any, object]] = [
            self._holds.ack_posted(p.account_id, p.balance, pairs, group=GROUP)
            if (pairs := by_account.get(p.account_id))
            else self._holds.sync_balance(p.account_id, p.balance)  # v1 entries only
            for p in postings
        ]
        if legacy:
            acks.append(self._ack_legacy(legacy))
        if len(acks) == 1:
            await acks[0]
        else:
            await asyncio.gather(*acks)
        duration_s = time.monotonic() - started
        stats = self.stats
        stats.batches += 1
        posted = duplicates = charged = 0
        for p in postings:
            posted += p.posted
            duplicates += p.duplicates
            charged += p.charged_millicredits
        stats.posted += posted
        stats.duplicates += duplicates
        stats.charged_millicredits += charged
        if stats.on_batch is not None:
            stats.on_batch(duration_s)
        log.info(
            "settlement batch posted",
            extra={
                "event": "settlement.batch_posted",
                "entries": len(batch),
                "posted": posted,
                "duplicates": duplicates,
                "accounts": len(postings),
                "chargedMillicredits": str(charged),
                "durationMs": int(duration_s * 1000),
            },
        )

    async def _ack_legacy(self, entry_ids: list[str]) -> None:
        """Delete and acknowledge posted entries of the v1 stream. Their charges were never
        in a v2 ``pending``: nothing to release (the posted balance is applied per account).
        Deleted first: an entry deleted but still pending is dropped by the next claim, while
        one acknowledged but not deleted would stay in the stream, read by no one."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xdel(LEGACY_OUTBOX_KEY, *entry_ids)
            pipe.xack(LEGACY_OUTBOX_KEY, GROUP, *entry_ids)
            await pipe.execute()

    async def dead_letter(
        self,
        entry_id: str,
        fields: Mapping[bytes, bytes] | Mapping[str, str],
        error: str,
        *,
        stream: str,
    ) -> None:
        """Move one outbox entry of ``stream`` to ``settlement_dead_letters``: the row first
        (its ``stream_entry_id`` is ``dead_letter_id(stream, entry_id)``), then
        ``dead_letter.lua`` acknowledges and deletes the entry and releases its charge from
        the account's ``pending`` (once: a repeat after a crash writes and releases nothing;
        nothing for an entry of the v1 stream or of an account of another shard, whose
        charge is in no ``pending`` of this slot).

        Postgres or Redis unreachable: raises (``POSTGRES_UNAVAILABLE``, ``RedisError``); the
        entry stays pending and is met again, and nothing is released before the row exists.
        """
        letter = _dead_letter_row(dead_letter_id(stream, entry_id), fields, error)
        async with self._pool.acquire() as conn:
            await conn.execute(_INSERT_DEAD_LETTER_SQL, *letter)
        account_id, charged = letter[2], letter[3]
        keys = [stream]
        if account_id is not None and outbox_key(shard_of(account_id)) == stream:
            keys.append(account_key(account_id))
        await self._dead_letter_script(keys=keys, args=[GROUP, entry_id, charged or 0])
        self.stats.dead_lettered += 1
        log.error(
            "settlement %s (outbox entry %s, account %s) dead-lettered: %s",
            letter[1],
            letter[0],
            account_id,
            error,
            extra={
                "event": "settlement.dead_lettered",
                "requestId": letter[1],
                "streamEntryId": letter[0],
                "accountId": account_id,
                "chargedMillicredits": None if charged is None else str(charged),
            },
        )


# "s07/" per shard stream: entry ids repeat across streams (each counts from its own clock).
_LETTER_PREFIXES: Final = {outbox_key(shard): f"s{shard:02d}/" for shard in SHARDS}


def dead_letter_id(stream: str, entry_id: str) -> str:
    """The ``settlement_dead_letters.stream_entry_id`` of an outbox entry: ``s07/<entry id>``
    for a shard's stream (two shards' streams may give one id to different entries), the bare
    entry id for the v1 stream (as v1 wrote it).

    Raises:
        KeyError: ``stream`` is no outbox stream.
    """
    if stream == LEGACY_OUTBOX_KEY:
        return entry_id
    return _LETTER_PREFIXES[stream] + entry_id


def _int64_field(value: bytes | str) -> int:
    """An outbox entry's charge or account id.

    Raises:
        ValueError: not a base-10 integer in [0, 2**63 - 1].
    """
    number = int(value)
    if not 0 <= number <= _INT64_MAX:
        raise ValueError(f"{number} is not a non-negative 64-bit integer")
    return number


def _escaped(value: bytes | str) -> str:
    """``value`` as text; bytes that are not UTF-8 escaped (``\\xff``)."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _dead_letter_row(
    entry_id: str, raw_fields: Mapping[bytes, bytes] | Mapping[str, str], error: str
) -> tuple[str, str | None, int | None, int | None, str, str]:
    """The ``settlement_dead_letters`` values of an entry, whatever it holds: (entry id,
    request id, account id, charged millicredits, payload, error); what cannot be read is
    None, the payload is the whole entry as JSON when it has no record field, and bytes that
    are not UTF-8 are escaped."""
    fields = {_escaped(name): _escaped(value) for name, value in raw_fields.items()}
    record_field, charged_field, account_field = STREAM_FIELDS
    payload = fields.get(record_field)
    request_id = None
    if isinstance(payload, str):
        try:
            value = orjson.loads(payload)
        except ValueError:
            value = None
        if isinstance(value, list) and value and isinstance(value[0], str):
            request_id = _text(value[0])
    else:
        payload = orjson.dumps(fields, default=str).decode()
    return (
        entry_id,
        request_id,
        _int64(fields.get(account_field)),
        _int64(fields.get(charged_field)),
        _text(payload),
        _text(error),
    )


def _int64(value: Any) -> int | None:
    """``value`` as a non-negative bigint (``_int64_field``), or None."""
    try:
        return _int64_field(value)
    except (ValueError, TypeError):
        return None


def _text(value: str) -> str:
    """``value`` as Postgres text can hold it (no NUL character)."""
    return value.replace("\x00", "\ufffd")
