"""The Redis key layout of the money path (v2): the one place that names billing's keys.

Every Lua script touches keys of one Redis Cluster hash slot. Accounts are grouped into
``SHARD_COUNT`` shards, ``shard = account_id % SHARD_COUNT``, and the shard is the hash tag,
so an account's keys, the deadline index and the outbox stream its holds and settlements
go to share one slot::

    cg:v2:{sNN}:acct:<N>:account          hash: bal, ver, held, pending, shortfall
    cg:v2:{sNN}:acct:<N>:holds            hash: request_id -> hold value
    cg:v2:{sNN}:acct:<N>:settled:<R>      string: request R's settlement (its idempotency)
    cg:v2:{sNN}:acct:<N>:spend:d:<YYYYMMDD>, ...:spend:m:<YYYYMM>   spend counters
    cg:v2:{sNN}:acct:<N>:rpm:<key_id>     sorted set: a key's request starts (rate limit)
    cg:v2:{sNN}:hold_deadlines            sorted set "N|request_id" by deadline (the sweeper's)
    cg:v2:{sNN}:settlements               stream: the shard's settlement outbox

``NN`` is the shard, two digits (``{s07}``). What the values hold: ``billing.metering.holds``
(account, holds, settled, spend), ``billing.metering.outbox`` (the stream's entries),
``billing.metering.rate_limit`` (rpm). ``hold_value.lua`` derives the spend keys from the
account key (``...:account`` -> ``...:spend:...``), so the two must keep one stem.

Whatever reads every shard (the settlement poster, the hold sweeper, the backlog readers,
reconciliation) issues one command per shard, pipelined or gathered, never one command that
names several shards' keys (a Redis Cluster refuses it: ``CROSSSLOT``).

Upgrading from v1 (``cg:v1:{acct:N}:...``, one ``cg:v1:settlements`` stream and one
``cg:v1:hold_deadlines``): the old fleet is stopped first; the v1 balances and holds are
caches and are ignored (balances reload from Postgres; a v1 hold left open only held back
balance in v1); the poster drains ``LEGACY_OUTBOX_KEY`` until it is empty.
"""

from __future__ import annotations

from typing import Final

#: Accounts are spread over this many shards (hash tags). Changing it moves every key: a
#: fleet restart with the outbox drained first, as for a layout version.
SHARD_COUNT: Final = 64
SHARDS: Final = range(SHARD_COUNT)

KEY_PREFIX: Final = "cg:v2"

#: The v1 layout's one outbox stream; the poster drains it after an upgrade (module docstring).
LEGACY_OUTBOX_KEY: Final = "cg:v1:settlements"

# "cg:v2:{s07}" per shard, formatted once: a key on the hot path costs one f-string.
_TAGS: Final = tuple(f"{KEY_PREFIX}:{{s{shard:02d}}}" for shard in SHARDS)
_OUTBOX_KEYS: Final = tuple(f"{tag}:settlements" for tag in _TAGS)
_DEADLINES_KEYS: Final = tuple(f"{tag}:hold_deadlines" for tag in _TAGS)


def shard_of(account_id: int) -> int:
    """The shard of an account: ``account_id % SHARD_COUNT`` (in ``SHARDS``)."""
    return account_id % SHARD_COUNT


def account_key(account_id: int) -> str:
    """Redis key of an account's balance hash."""
    return f"{_TAGS[account_id % SHARD_COUNT]}:acct:{account_id}:account"


def holds_key(account_id: int) -> str:
    """Redis key of an account's open holds."""
    return f"{_TAGS[account_id % SHARD_COUNT]}:acct:{account_id}:holds"


def settled_key(account_id: int, request_id: str) -> str:
    """Redis key of the marker ``settle.lua`` leaves for a settled request (its idempotency)."""
    return f"{_TAGS[account_id % SHARD_COUNT]}:acct:{account_id}:settled:{request_id}"


def spend_key(account_id: int, window: str, window_id: str) -> str:
    """Redis key of an account's spend counters of one window: ``window`` is ``d`` (a UTC
    day, ``window_id`` ``20261203``) or ``m`` (a month, ``202612``)."""
    return f"{_TAGS[account_id % SHARD_COUNT]}:acct:{account_id}:spend:{window}:{window_id}"


def rpm_key(account_id: int, api_key_id: int) -> str:
    """Redis key of an API key's admitted request starts (``billing.metering.rate_limit``)."""
    return f"{_TAGS[account_id % SHARD_COUNT]}:acct:{account_id}:rpm:{api_key_id}"


def deadlines_key(shard: int) -> str:
    """Redis key of a shard's hold deadline index (members ``"N|request_id"``).

    Raises:
        IndexError: ``shard`` not in ``SHARDS``.
    """
    return _DEADLINES_KEYS[shard]


def outbox_key(shard: int) -> str:
    """Redis key of a shard's settlement outbox stream.

    Raises:
        IndexError: ``shard`` not in ``SHARDS``.
    """
    return _OUTBOX_KEYS[shard]


def outbox_keys() -> tuple[str, ...]:
    """Every shard's outbox stream, in shard order (``LEGACY_OUTBOX_KEY`` not included)."""
    return _OUTBOX_KEYS


def deadlines_keys() -> tuple[str, ...]:
    """Every shard's hold deadline index, in shard order."""
    return _DEADLINES_KEYS
