"""Spend controls as stored: the same four columns on ``accounts`` and ``api_keys``.

A NULL cap is no cap; ``allowed_models`` NULL is every model (migrations/0007). Windows are
calendar days and months in UTC. Amounts are integer millicredits. This module only reads
and writes the settings; the money path enforces them inside the hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

CONTROL_COLUMNS: Final = (
    "daily_spend_cap_millicredits",
    "monthly_spend_cap_millicredits",
    "max_request_millicredits",
    "allowed_models",
)
"""The spend-control columns both ``accounts`` and ``api_keys`` carry, in this order."""


@dataclass(frozen=True, slots=True)
class SpendControls:
    """One account's or key's spend controls; None is "no limit".

    Attributes:
        daily_spend_cap_millicredits: most a UTC calendar day may charge.
        monthly_spend_cap_millicredits: most a UTC calendar month may charge.
        max_request_millicredits: most one request may hold (its worst case).
        allowed_models: the only models it may use; None for every model.
    """

    daily_spend_cap_millicredits: int | None = None
    monthly_spend_cap_millicredits: int | None = None
    max_request_millicredits: int | None = None
    allowed_models: tuple[str, ...] | None = None


NO_CONTROLS: Final = SpendControls()
"""No cap, every model."""


def controls_from_row(row: Mapping[str, Any]) -> SpendControls:
    """The controls of a row that selected ``CONTROL_COLUMNS``."""
    models = row["allowed_models"]
    return SpendControls(
        daily_spend_cap_millicredits=row["daily_spend_cap_millicredits"],
        monthly_spend_cap_millicredits=row["monthly_spend_cap_millicredits"],
        max_request_millicredits=row["max_request_millicredits"],
        allowed_models=None if models is None else tuple(models),
    )


def controls_snapshot(controls: SpendControls) -> dict[str, Any]:
    """The controls as a JSON-able dict with the column names (audit before/after)."""
    models = controls.allowed_models
    return {
        "daily_spend_cap_millicredits": controls.daily_spend_cap_millicredits,
        "monthly_spend_cap_millicredits": controls.monthly_spend_cap_millicredits,
        "max_request_millicredits": controls.max_request_millicredits,
        "allowed_models": None if models is None else list(models),
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
    text). Nothing is written when ``changes`` is empty.

    Raises:
        ValueError: a column outside ``allowed``.
        asyncpg.UniqueViolationError / CheckViolationError: as the table's constraints say.
    """
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    if not changes:
        return
    columns = list(changes)
    assignments = ", ".join(f"{name} = ${index}" for index, name in enumerate(columns, 2))
    await conn.execute(
        f"UPDATE {table} SET {assignments} WHERE id = $1",
        row_id,
        *(list(v) if isinstance(v, tuple) else v for v in changes.values()),
    )
