"""Live flags: the operators' switches, changed at run time without a restart.

The seven flags are named as the go-live runbook names them. ``DEFINITIONS`` is the one table
of them (name, type and its validation, environment variable, default, description): the
settings read the environment through it, the services read the ``flags`` table through it,
the admin API validates and describes with it, and docs/admin-api.md documents it.

Where a value comes from: a row of the ``flags`` table (set by ``set_flag``) overrides the
environment's value (``runtime.settings.Settings``, the *initial* value); ``reset_flag``
deletes the row, so the flag is back at its initial value. Each change writes one audit row
and queues a ``ControlKind.FLAGS`` event in its transaction (``billing.control``); every
process then re-reads the flags (``runtime.control``).

``LiveFlags`` is the immutable snapshot the hot path reads: a request takes one snapshot when
it starts and keeps it to its settlement, so a flip never splits a request (a hold placed with
charging on is settled with charging on, at the same rounding).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeAlias, TypeVar

import asyncpg
import orjson

from billing.audit import Actor, record_audit
from billing.control import ControlKind, notify_control
from billing.errors import BillingError
from billing.metering.pricing import RoundingMode

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class ChargingPausedMode(enum.StrEnum):
    """What a billed request gets while ``billing.charging_enabled`` is false."""

    FREE = "free"
    """Served, and its usage recorded as ``uncharged`` (nothing held, nothing charged)."""
    BLOCK = "block"
    """Refused with 503 ``charging_paused`` before anything is held or forwarded."""


class Billing(enum.Enum):
    """How one request is billed under a snapshot of the flags (``LiveFlags.billing_for``)."""

    CHARGED = "charged"
    UNCHARGED = "uncharged"
    BLOCKED = "blocked"


class UnknownFlagError(BillingError):
    """No flag has this name (HTTP 404).

    Attributes:
        name: the name asked for.
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown flag {name!r}")
        self.name = name


class FlagValueError(BillingError):
    """A value a flag does not accept (HTTP 400); the message says what it accepts.

    Attributes:
        name: the flag's name (or its environment variable, from the settings).
        reason: what is wrong, e.g. ``"must be an integer from 0 to 100"``.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} {reason}")
        self.name = name
        self.reason = reason


# -- kinds: one per type of value ---------------------------------------------------------


class FlagKind(Generic[_T]):
    """A type of flag value: how it is read from JSON and from an environment variable, how
    it is written as JSON, and its JSON Schema. ``from_*`` raise ``ValueError`` with the
    reason (``FlagDefinition`` names the flag)."""

    json_schema: Mapping[str, Any]

    def from_json(self, value: object) -> _T:
        raise NotImplementedError

    def from_text(self, raw: str) -> _T:
        raise NotImplementedError

    def to_json(self, value: _T) -> Any:
        return value


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class BooleanKind(FlagKind[bool]):
    def __init__(self) -> None:
        self.json_schema = {"type": "boolean"}

    def from_json(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value

    def from_text(self, raw: str) -> bool:
        text = raw.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("must be true or false")


_E = TypeVar("_E", bound=enum.StrEnum)


class ChoiceKind(FlagKind[_E]):
    def __init__(self, choices: type[_E]) -> None:
        self._choices = choices
        self.json_schema = {"type": "string", "enum": [c.value for c in choices]}
        self._reason = "must be " + " or ".join(repr(c.value) for c in choices)

    def from_json(self, value: object) -> _E:
        if isinstance(value, str):
            for choice in self._choices:
                if value == choice.value:
                    return choice
        raise ValueError(self._reason)

    def from_text(self, raw: str) -> _E:
        return self.from_json(raw.strip().lower())

    def to_json(self, value: _E) -> str:
        return value.value


class IntegerKind(FlagKind[int]):
    def __init__(self, minimum: int, maximum: int | None = None) -> None:
        self._minimum = minimum
        self._maximum = maximum
        schema: dict[str, Any] = {"type": "integer", "minimum": minimum}
        if maximum is None:
            self._reason = f"must be an integer >= {minimum}"
        else:
            schema["maximum"] = maximum
            self._reason = f"must be an integer from {minimum} to {maximum}"
        self.json_schema = schema

    def from_json(self, value: object) -> int:
        # bool is an int in Python; true is not a percentage.
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(self._reason)
        if value < self._minimum or (self._maximum is not None and value > self._maximum):
            raise ValueError(self._reason)
        return value

    def from_text(self, raw: str) -> int:
        try:
            return self.from_json(int(raw.strip()))
        except ValueError:
            raise ValueError(self._reason) from None


class ModelListKind(FlagKind[frozenset[str]]):
    """Model names; in the environment, comma-separated (blank items dropped)."""

    MAX_MODELS = 1000
    MAX_NAME_LENGTH = 200
    _REASON = (
        f"must be a list of at most {MAX_MODELS} model names "
        f"(non-empty strings of at most {MAX_NAME_LENGTH} characters)"
    )

    def __init__(self) -> None:
        self.json_schema = {
            "type": "array",
            "maxItems": self.MAX_MODELS,
            # No NUL: Postgres's jsonb cannot store one.
            "items": {
                "type": "string",
                "minLength": 1,
                "maxLength": self.MAX_NAME_LENGTH,
                "pattern": "^[^\\x00]*$",
            },
        }

    def from_json(self, value: object) -> frozenset[str]:
        if not isinstance(value, list) or len(value) > self.MAX_MODELS:
            raise ValueError(self._REASON)
        names = []
        for item in value:
            if not isinstance(item, str) or not self._is_name(item):
                raise ValueError(self._REASON)
            names.append(item.strip())
        return frozenset(names)

    def _is_name(self, item: str) -> bool:
        name = item.strip()
        return bool(name) and len(item) <= self.MAX_NAME_LENGTH and "\x00" not in name

    def from_text(self, raw: str) -> frozenset[str]:
        return frozenset(item.strip() for item in raw.split(",") if item.strip())

    def to_json(self, value: frozenset[str]) -> list[str]:
        return sorted(value)


@dataclass(frozen=True, slots=True)
class FlagDefinition(Generic[_T]):
    """One flag.

    Attributes:
        name: as the runbook and the admin API name it, e.g. ``billing.charging_enabled``.
        attribute: its ``LiveFlags`` attribute, and the ``Settings`` field of its initial value.
        env: the environment variable of its initial value.
        kind: its type and validation.
        default: the initial value when ``env`` is unset or blank.
        description: what it does (the admin API's description and the docs).
    """

    name: str
    attribute: str
    env: str
    kind: FlagKind[_T]
    default: _T
    description: str

    def from_json(self, value: object) -> _T:
        """Raises: FlagValueError: a value this flag does not accept."""
        try:
            return self.kind.from_json(value)
        except ValueError as exc:
            raise FlagValueError(self.name, str(exc)) from None

    def to_json(self, value: _T) -> Any:
        return self.kind.to_json(value)


PURCHASE_ENABLED = FlagDefinition(
    "billing.purchase_enabled",
    "purchases_enabled",
    "PURCHASES_ENABLED",
    BooleanKind(),
    True,
    "Users may buy credits (checkout). False: checkout answers 503 purchases_unavailable; "
    "balances, API use and webhooks of purchases already started are not affected.",
)
CHARGING_ENABLED = FlagDefinition(
    "billing.charging_enabled",
    "charging_enabled",
    "CHARGING_ENABLED",
    BooleanKind(),
    True,
    "Billed requests are held and charged. False: billing.charging_paused_mode decides.",
)
CHARGING_PAUSED_MODE = FlagDefinition(
    "billing.charging_paused_mode",
    "charging_paused_mode",
    "CHARGING_PAUSED_MODE",
    ChoiceKind(ChargingPausedMode),
    ChargingPausedMode.FREE,
    "While charging is off: 'free' serves billed requests and records their usage as "
    "uncharged; 'block' refuses them with 503 charging_paused, nothing forwarded.",
)
ROUNDING_MODE = FlagDefinition(
    "billing.rounding_mode",
    "rounding_mode",
    "ROUNDING_MODE",
    ChoiceKind(RoundingMode),
    RoundingMode.EXACT,
    "How a charge is rounded up: 'exact' to the millicredit, 'ceil' to the whole credit.",
)
MODEL_ALLOWLIST = FlagDefinition(
    "billing.model_allowlist",
    "model_allowlist",
    "MODEL_ALLOWLIST",
    ModelListKind(),
    frozenset(),
    "Models served (of those with a rate card); empty: all. Others answer 404 "
    "model_not_found and are left out of /v1/models.",
)
LOW_BALANCE_THRESHOLD_CREDITS = FlagDefinition(
    "billing.low_balance_threshold_credits",
    "low_balance_threshold_credits",
    "LOW_BALANCE_THRESHOLD_CREDITS",
    # At most 10^12 credits: in millicredits it stays far inside a bigint and JSON's safe range.
    IntegerKind(0, 10**12),
    500,
    "Credits below which a balance counts as low (the Credits page warns).",
)
CHARGING_ROLLOUT_PERCENT = FlagDefinition(
    "billing.charging_rollout_percent",
    "charging_rollout_percent",
    "CHARGING_ROLLOUT_PERCENT",
    IntegerKind(0, 100),
    100,
    "Percent of accounts charged (a stable hash of the account id picks them: raising it "
    "only adds accounts); the others are served uncharged and their usage recorded as such.",
)

DEFINITIONS: tuple[FlagDefinition[Any], ...] = (
    PURCHASE_ENABLED,
    CHARGING_ENABLED,
    CHARGING_PAUSED_MODE,
    ROUNDING_MODE,
    MODEL_ALLOWLIST,
    LOW_BALANCE_THRESHOLD_CREDITS,
    CHARGING_ROLLOUT_PERCENT,
)
_BY_NAME: dict[str, FlagDefinition[Any]] = {d.name: d for d in DEFINITIONS}


def definition(name: str) -> FlagDefinition[Any]:
    """The flag named ``name``.

    Raises:
        UnknownFlagError: no flag has that name.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownFlagError(name) from None


def in_rollout(account_id: int, percent: int) -> bool:
    """Whether an account is among the ``percent`` (0-100) charged by a partial rollout.

    CRC-32 of the id's decimal text, mod 100, below ``percent``: stable across processes and
    restarts (unlike ``hash()``), and monotone in ``percent``, so raising it only adds accounts.
    """
    return zlib.crc32(str(account_id).encode()) % 100 < percent


@dataclass(frozen=True, slots=True)
class LiveFlags:
    """The flags' values at one moment; immutable, so a request reads one consistent set.

    Attributes are the definitions' ``attribute`` names; see ``DEFINITIONS`` for each.
    """

    purchases_enabled: bool = PURCHASE_ENABLED.default
    charging_enabled: bool = CHARGING_ENABLED.default
    charging_paused_mode: ChargingPausedMode = CHARGING_PAUSED_MODE.default
    rounding_mode: RoundingMode = ROUNDING_MODE.default
    model_allowlist: frozenset[str] = MODEL_ALLOWLIST.default
    low_balance_threshold_credits: int = LOW_BALANCE_THRESHOLD_CREDITS.default
    charging_rollout_percent: int = CHARGING_ROLLOUT_PERCENT.default

    def serves_model(self, model: str) -> bool:
        """The allow list admits ``model`` (an empty list admits every model)."""
        return not self.model_allowlist or model in self.model_allowlist

    def billing_for(self, account_id: int) -> Billing:
        """How a billed request of ``account_id`` is billed: charged, served uncharged
        (charging off in ``free`` mode, or the account outside the rollout), or blocked
        (charging off in ``block`` mode)."""
        if not self.charging_enabled:
            if self.charging_paused_mode is ChargingPausedMode.BLOCK:
                return Billing.BLOCKED
            return Billing.UNCHARGED
        percent = self.charging_rollout_percent
        if percent >= 100 or in_rollout(account_id, percent):
            return Billing.CHARGED
        return Billing.UNCHARGED

    def value(self, flag: FlagDefinition[_T]) -> _T:
        """This snapshot's value of ``flag``."""
        value: _T = getattr(self, flag.attribute)
        return value

    def with_overrides(self, rows: Mapping[str, object]) -> LiveFlags:
        """These flags with the ``flags`` table's rows (name -> JSON value) applied.

        A row that names no flag, or holds a value its flag does not accept (written by hand
        in SQL, or by a newer release), is logged and ignored: that flag keeps this value.
        """
        changes: dict[str, Any] = {}
        for name, value in rows.items():
            flag = _BY_NAME.get(name)
            if flag is None:
                log.warning("flags table: unknown flag %r ignored", name)
                continue
            try:
                changes[flag.attribute] = flag.from_json(value)
            except FlagValueError as exc:
                log.warning("flags table: %s; the initial value stays in force", exc)
        return dataclasses.replace(self, **changes) if changes else self


# -- storage: the flags table -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlagState:
    """A flag as the admin API shows it.

    Attributes:
        value, initial_value: JSON values (the initial one is the environment's).
        source: ``"database"`` (a row overrides the initial value) or ``"environment"``.
        updated_at, updated_by: of the row; None when the source is the environment.
    """

    name: str
    value: Any
    initial_value: Any
    source: str
    updated_at: datetime | None
    updated_by: str | None
    env: str
    description: str
    json_schema: Mapping[str, Any]

    def audit_snapshot(self) -> dict[str, Any]:
        """What the audit log keeps of it (before and after a change)."""
        return {"value": self.value, "source": self.source}


Executor: TypeAlias = asyncpg.Connection | asyncpg.Pool


async def read_overrides(db: Executor) -> dict[str, object]:
    """The ``flags`` table: name -> JSON value.

    Raises:
        asyncpg.PostgresError, OSError: Postgres unreachable (see ``POSTGRES_UNAVAILABLE``);
            the caller keeps the flags it has.
    """
    rows = await db.fetch("SELECT name, value::text AS value FROM flags")
    return {row["name"]: orjson.loads(row["value"]) for row in rows}


async def load_flags(db: Executor, initial: LiveFlags) -> LiveFlags:
    """``initial`` with the ``flags`` table applied.

    Raises:
        asyncpg.PostgresError, OSError: as ``read_overrides``.
    """
    return initial.with_overrides(await read_overrides(db))


def _state(flag: FlagDefinition[Any], initial: LiveFlags, row: asyncpg.Record | None) -> FlagState:
    initial_json = flag.to_json(initial.value(flag))
    value = initial_json
    if row is not None:
        try:
            value = flag.to_json(flag.from_json(orjson.loads(row["value"])))
        except FlagValueError:
            row = None  # an unusable row is not in force (``LiveFlags.with_overrides``)
    return FlagState(
        name=flag.name,
        value=value,
        initial_value=initial_json,
        source="environment" if row is None else "database",
        updated_at=None if row is None else row["updated_at"],
        updated_by=None if row is None else row["updated_by"],
        env=flag.env,
        description=flag.description,
        json_schema=flag.kind.json_schema,
    )


_SELECT = "SELECT name, value::text AS value, updated_at, updated_by FROM flags"


async def flag_states(db: Executor, initial: LiveFlags) -> list[FlagState]:
    """Every flag, in ``DEFINITIONS`` order, with where its value comes from.

    Raises:
        asyncpg.PostgresError, OSError: Postgres unreachable.
    """
    rows = {row["name"]: row for row in await db.fetch(_SELECT)}
    return [_state(flag, initial, rows.get(flag.name)) for flag in DEFINITIONS]


async def flag_state(db: Executor, name: str, initial: LiveFlags) -> FlagState:
    """One flag (see ``flag_states``).

    Raises:
        UnknownFlagError: no flag has that name.
        asyncpg.PostgresError, OSError: Postgres unreachable.
    """
    flag = definition(name)
    return _state(flag, initial, await db.fetchrow(_SELECT + " WHERE name = $1", name))


async def set_flag(
    conn: asyncpg.Connection, actor: Actor, name: str, value: object, initial: LiveFlags
) -> FlagState:
    """Set a flag in the database (it overrides the initial value), in one transaction with
    its audit row (``flag.set``) and a ``FLAGS`` control event.

    Args:
        value: the JSON value (validated here; stored normalised, e.g. a model list sorted).

    Returns:
        The flag after the change.

    Raises:
        UnknownFlagError: no flag has that name (404).
        FlagValueError: the flag does not accept ``value`` (400).
        asyncpg.PostgresError, OSError: Postgres unreachable; nothing changed.
    """
    flag = definition(name)
    stored = orjson.dumps(flag.to_json(flag.from_json(value))).decode()
    async with conn.transaction():
        before = await _locked_state(conn, flag, initial)
        await conn.execute(
            """INSERT INTO flags (name, value, updated_at, updated_by)
               VALUES ($1, $2::jsonb, now(), $3)
               ON CONFLICT (name) DO UPDATE SET
                   value = EXCLUDED.value, updated_at = now(), updated_by = EXCLUDED.updated_by""",
            name,
            stored,
            actor.name,
        )
        return await _record_change(conn, actor, "flag.set", flag, initial, before)


async def reset_flag(
    conn: asyncpg.Connection, actor: Actor, name: str, initial: LiveFlags
) -> FlagState:
    """Back to the initial value: delete the flag's row, in one transaction with its audit
    row (``flag.reset``) and a ``FLAGS`` control event. A flag with no row is reset too (the
    audit row records it; nothing else changes).

    Returns:
        The flag after the change (``source == "environment"``).

    Raises:
        UnknownFlagError: no flag has that name (404).
        asyncpg.PostgresError, OSError: Postgres unreachable; nothing changed.
    """
    flag = definition(name)
    async with conn.transaction():
        before = await _locked_state(conn, flag, initial)
        await conn.execute("DELETE FROM flags WHERE name = $1", name)
        return await _record_change(conn, actor, "flag.reset", flag, initial, before)


async def _locked_state(
    conn: asyncpg.Connection, flag: FlagDefinition[Any], initial: LiveFlags
) -> FlagState:
    # Two changes of one flag at once (with or without a row yet) queue here, so each audits
    # the other's result as its "before".
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('flags:' || $1))", flag.name)
    return _state(flag, initial, await conn.fetchrow(_SELECT + " WHERE name = $1", flag.name))


async def _record_change(
    conn: asyncpg.Connection,
    actor: Actor,
    action: str,
    flag: FlagDefinition[Any],
    initial: LiveFlags,
    before: FlagState,
) -> FlagState:
    after = _state(flag, initial, await conn.fetchrow(_SELECT + " WHERE name = $1", flag.name))
    await record_audit(
        conn,
        actor,
        action=action,
        target_type="flag",
        target_id=flag.name,
        before=before.audit_snapshot(),
        after=after.audit_snapshot(),
    )
    await notify_control(conn, ControlKind.FLAGS)
    return after
