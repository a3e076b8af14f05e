"""Spend controls of a key and of its account: what they are, and the checks that need no I/O.

Each holder (the key, its account) may have, all optional (NULL in Postgres: no limit):

- a **daily** and a **monthly credit cap**: what requests that *started* in the UTC calendar
  day / month may spend together (their holds while open, their charges once settled). They
  are enforced inside the reserve script, atomically with the balance
  (``billing/metering/lua/reserve.lua``); this module computes the windows and the caps it
  passes;
- a **maximum charge per request**: a request whose hold (its worst case) is above it is
  refused before anything is held (``check_max_request``);
- an **allow list of models**: a model must be in both lists where both are set
  (``check_model``);
- for the key only, a **requests-per-minute** limit (``billing/metering/rate_limit.py``).

An account can also be **suspended** by an operator: every billed request of its keys is
refused (403). ``SpendControls`` is None on an identity when none of this is set, so a key
without controls pays no check here and no Redis or Postgres call more (its holds still keep
the account's spend counters up to date where they exist, inside the reserve script).

Source: docs/design.md, "Admin API and live control" (issue 12, "Spend controls").
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final

import asyncpg

from billing.errors import ModelNotAllowedError, SpendCapExceededError

_MS_PER_DAY = 86_400_000


class SpendCap(enum.StrEnum):
    """Which cap refused a request (the 402's ``cap``)."""

    KEY_DAILY = "key_daily"
    KEY_MONTHLY = "key_monthly"
    ACCOUNT_DAILY = "account_daily"
    ACCOUNT_MONTHLY = "account_monthly"
    KEY_MAX_REQUEST = "key_max_request"
    ACCOUNT_MAX_REQUEST = "account_max_request"

    @property
    def window(self) -> str:
        """``day``, ``month`` or ``request`` (the 402's ``window``)."""
        return _WINDOWS[self]

    @property
    def holder(self) -> str:
        """``key`` or ``account``: whose cap it is."""
        return self.value.partition("_")[0]


_WINDOWS = {
    SpendCap.KEY_DAILY: "day",
    SpendCap.ACCOUNT_DAILY: "day",
    SpendCap.KEY_MONTHLY: "month",
    SpendCap.ACCOUNT_MONTHLY: "month",
    SpendCap.KEY_MAX_REQUEST: "request",
    SpendCap.ACCOUNT_MAX_REQUEST: "request",
}

#: The window caps in the order of the spend counter fields the reserve script reads: the
#: day's account and key fields, then the month's (``WindowCaps``, ``reserve.lua``).
COUNTER_CAPS: tuple[SpendCap, ...] = (
    SpendCap.ACCOUNT_DAILY,
    SpendCap.KEY_DAILY,
    SpendCap.ACCOUNT_MONTHLY,
    SpendCap.KEY_MONTHLY,
)

WindowCaps = tuple[int | None, int | None, int | None, int | None]
"""Caps in millicredits in ``COUNTER_CAPS`` order; None: no cap."""


@dataclass(frozen=True, slots=True)
class Limits:
    """One holder's controls (a key's or an account's); None: no limit.

    Attributes:
        allowed_models: None: every model; else only these.
    """

    daily_spend_cap_millicredits: int | None = None
    monthly_spend_cap_millicredits: int | None = None
    max_request_millicredits: int | None = None
    allowed_models: frozenset[str] | None = None

    @property
    def is_empty(self) -> bool:
        """No limit set."""
        return self == _NO_LIMITS


_NO_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class SpendControls:
    """Everything the gateway enforces for one key, read with the key (``find_active_key``).

    Attributes:
        account_suspended: an operator suspended the account (403 ``account_deactivated``).
        key, account: each holder's limits.
        requests_per_minute: the key's limit; None: no limit.
        window_caps: the day and month caps in ``COUNTER_CAPS`` order, or None when none is
            set (the reserve script then only keeps the counters that exist up to date).
    """

    account_suspended: bool
    key: Limits
    account: Limits
    requests_per_minute: int | None
    window_caps: WindowCaps | None

    @classmethod
    def of(
        cls,
        *,
        account_suspended: bool,
        key: Limits,
        account: Limits,
        requests_per_minute: int | None,
    ) -> SpendControls | None:
        """The controls, or None when nothing is set (the hot path's usual case)."""
        if (
            not account_suspended
            and key.is_empty
            and account.is_empty
            and requests_per_minute is None
        ):
            return None
        caps: WindowCaps = (
            account.daily_spend_cap_millicredits,
            key.daily_spend_cap_millicredits,
            account.monthly_spend_cap_millicredits,
            key.monthly_spend_cap_millicredits,
        )
        return cls(
            account_suspended=account_suspended,
            key=key,
            account=account,
            requests_per_minute=requests_per_minute,
            window_caps=None if caps == (None, None, None, None) else caps,
        )


def limits_from_row(
    daily: int | None, monthly: int | None, max_request: int | None, models: Sequence[str] | None
) -> Limits:
    """A holder's ``Limits`` from its four columns."""
    return Limits(daily, monthly, max_request, None if models is None else frozenset(models))


def check_model(controls: SpendControls, model: str) -> None:
    """Refuse a model outside the key's or the account's allow list.

    Raises:
        ModelNotAllowedError: 403 ``model_not_allowed``, naming the list (the key's first).
    """
    for holder, limits in (("key", controls.key), ("account", controls.account)):
        if limits.allowed_models is not None and model not in limits.allowed_models:
            raise ModelNotAllowedError(model, holder=holder)


def check_max_request(controls: SpendControls, hold_millicredits: int) -> None:
    """Refuse a request whose hold (its worst-case charge) is above the key's or the account's
    maximum charge per request. The charge never exceeds the hold (but for a clamped overrun,
    capped at the hold's own cover), so the hold is what is compared.

    Raises:
        SpendCapExceededError: 402 ``spend_cap_exceeded``, naming the lower of the two caps
            that is passed (the key's when equal).
    """
    refused: tuple[SpendCap, int] | None = None
    for cap, limit in (
        (SpendCap.KEY_MAX_REQUEST, controls.key.max_request_millicredits),
        (SpendCap.ACCOUNT_MAX_REQUEST, controls.account.max_request_millicredits),
    ):
        if (
            limit is not None
            and hold_millicredits > limit
            and (refused is None or limit < refused[1])
        ):
            refused = (cap, limit)
    if refused is not None:
        raise SpendCapExceededError(
            cap=refused[0],
            cap_millicredits=refused[1],
            spent_millicredits=0,
            required_millicredits=hold_millicredits,
            resets_at_ms=None,
        )


# -- windows --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpendWindows:
    """The UTC calendar day and month a request started in.

    Attributes:
        day_id, month_id: ``"20261203"``, ``"202612"`` (the counters' key suffixes).
        day_start_ms, day_reset_ms, month_start_ms, month_reset_ms: the windows' bounds,
            Unix ms (start inclusive, reset exclusive).
    """

    day_id: str
    month_id: str
    day_start_ms: int
    day_reset_ms: int
    month_start_ms: int
    month_reset_ms: int

    def resets_at_ms(self, cap: SpendCap) -> int | None:
        """When ``cap``'s window ends (Unix ms), None for a per-request cap."""
        window = cap.window
        if window == "day":
            return self.day_reset_ms
        return self.month_reset_ms if window == "month" else None


def spend_windows(started_ms: int) -> SpendWindows:
    """The windows of a request started at ``started_ms`` (Unix ms)."""
    return _windows_of_day(started_ms // _MS_PER_DAY)


@lru_cache(maxsize=4)
def _windows_of_day(day_number: int) -> SpendWindows:
    day = datetime.fromtimestamp(day_number * 86_400, UTC)
    month = day.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)
    return SpendWindows(
        day_id=day.strftime("%Y%m%d"),
        month_id=day.strftime("%Y%m"),
        day_start_ms=day_number * _MS_PER_DAY,
        day_reset_ms=(day_number + 1) * _MS_PER_DAY,
        month_start_ms=int(month.timestamp()) * 1000,
        month_reset_ms=int(next_month.timestamp()) * 1000,
    )


def iso_utc(unix_ms: int) -> str:
    """``2026-12-04T00:00:00Z``: a time at the JSON edge."""
    moment = datetime.fromtimestamp(unix_ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + "Z"


async def window_spend(
    conn: asyncpg.Connection | asyncpg.Pool,
    account_id: int,
    api_key_id: int,
    windows: SpendWindows,
) -> tuple[int, int, int, int]:
    """What posted usage of the account and of the key charged in the windows (by when each
    request started), in ``COUNTER_CAPS`` order: the day's account and key, the month's
    account and key. One query (index ``usage_events_account_started_idx``).

    Raises:
        OSError / asyncpg.PostgresError: Postgres unreachable.
    """
    row = await conn.fetchrow(
        """SELECT
             COALESCE(sum(charged_millicredits) FILTER (WHERE started_at >= $3
                                                          AND started_at < $6), 0),
             COALESCE(sum(charged_millicredits) FILTER (WHERE started_at >= $3
                                                          AND started_at < $6
                                                          AND api_key_id = $2), 0),
             COALESCE(sum(charged_millicredits), 0),
             COALESCE(sum(charged_millicredits) FILTER (WHERE api_key_id = $2), 0)
           FROM usage_events
           WHERE account_id = $1 AND started_at >= $4 AND started_at < $5""",
        account_id,
        api_key_id,
        datetime.fromtimestamp(windows.day_start_ms / 1000, UTC),
        datetime.fromtimestamp(windows.month_start_ms / 1000, UTC),
        datetime.fromtimestamp(windows.month_reset_ms / 1000, UTC),
        datetime.fromtimestamp(windows.day_reset_ms / 1000, UTC),
    )
    assert row is not None  # an aggregate always answers one row
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


# Stored controls as operators change them (the admin API): the same four columns on
# ``accounts`` and ``api_keys`` (migrations/0007).

CONTROL_COLUMNS: Final = (
    "daily_spend_cap_millicredits",
    "monthly_spend_cap_millicredits",
    "max_request_millicredits",
    "allowed_models",
)
"""The spend-control columns both ``accounts`` and ``api_keys`` carry, in ``Limits`` order."""


def limits_from_record(row: Mapping[str, Any]) -> Limits:
    """The ``Limits`` of a row that selected ``CONTROL_COLUMNS`` by name."""
    return limits_from_row(*(row[column] for column in CONTROL_COLUMNS))


def limits_snapshot(limits: Limits) -> dict[str, Any]:
    """The limits as a JSON-able dict of their column names (audit before/after); the
    allowed models sorted."""
    models = limits.allowed_models
    return {
        "daily_spend_cap_millicredits": limits.daily_spend_cap_millicredits,
        "monthly_spend_cap_millicredits": limits.monthly_spend_cap_millicredits,
        "max_request_millicredits": limits.max_request_millicredits,
        "allowed_models": None if models is None else sorted(models),
    }


async def update_columns(
    conn: asyncpg.Connection,
    table: str,
    row_id: int,
    changes: Mapping[str, Any],
    *,
    allowed: frozenset[str],
) -> None:
    """``UPDATE table SET column = value, ... WHERE id = row_id`` for the given columns.

    Only names in ``allowed`` are written (they become SQL identifiers: never a client's
    text); ``table`` is the caller's constant. Nothing is written when ``changes`` is empty.

    Raises:
        ValueError: a column outside ``allowed``.
        asyncpg.UniqueViolationError / CheckViolationError: as the table's constraints say.
    """
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    if not changes:
        return
    assignments = ", ".join(f"{name} = ${index}" for index, name in enumerate(changes, 2))
    values = (sorted(v) if isinstance(v, frozenset) else v for v in changes.values())
    await conn.execute(f"UPDATE {table} SET {assignments} WHERE id = $1", row_id, *values)
