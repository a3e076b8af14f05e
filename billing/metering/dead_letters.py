"""Dead-lettered settlements: listing them and replaying one after its cause was fixed.

The settlement poster (``billing.metering.posting``) writes a row of
``settlement_dead_letters`` for each outbox entry Postgres refused or that could not be read,
and releases its charge from the account's Redis ``pending``. An operator lists the rows
(``creditgate outbox dead-letters``), fixes the cause (creates the missing account, corrects
the payload by hand) and replays one (``creditgate outbox replay ENTRY_ID``): its record is
posted through ``post_settlements`` as the poster would have, in the transaction that sets
``replayed_at``. The charge is then taken from the Postgres balance (capped at what it still
covers, like every settlement), not from Redis: ``pending`` no longer holds it.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from billing.errors import DeadLetterNotFoundError
from billing.metering.outbox import posting_row
from billing.metering.posting import AccountPosting, post_settlements


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One ``settlement_dead_letters`` row (see ``migrations/0006_*``); what the entry did
    not say readably is None."""

    stream_entry_id: str
    request_id: str | None
    account_id: int | None
    charged_millicredits: int | None
    payload: str
    error: str
    created_at: datetime
    replayed_at: datetime | None


class ReplayOutcome(enum.StrEnum):
    """What a replay did: posted the record now, or nothing (replayed before, or its request
    id was posted some other way; ``replayed_at`` is set then too)."""

    POSTED = "posted"
    ALREADY_REPLAYED = "already_replayed"
    ALREADY_POSTED = "already_posted"


@dataclass(frozen=True, slots=True)
class Replay:
    """A replay's result; ``posting`` is the account's posting when ``POSTED``."""

    dead_letter: DeadLetter
    outcome: ReplayOutcome
    posting: AccountPosting | None = None


_COLUMNS = """stream_entry_id, request_id, account_id, charged_millicredits, payload, error,
              created_at, replayed_at"""


async def list_dead_letters(
    conn: asyncpg.Connection, *, include_replayed: bool = False
) -> list[DeadLetter]:
    """The dead letters in the order they were written; by default only those not replayed.

    Raises:
        POSTGRES_UNAVAILABLE: Postgres unreachable.
    """
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM settlement_dead_letters"
        " WHERE $1 OR replayed_at IS NULL ORDER BY id",
        include_replayed,
    )
    return [DeadLetter(*row) for row in rows]


async def replay_dead_letter(conn: asyncpg.Connection, stream_entry_id: str) -> Replay:
    """Post one dead letter's record through ``post_settlements`` and set its
    ``replayed_at``, in one transaction; idempotent (a second replay, or one whose request
    id is already in ``usage_events``, posts nothing and says so).

    Raises:
        DeadLetterNotFoundError: no dead letter for ``stream_entry_id``.
        ValueError: its payload is not a settlement record, or its charge is unknown (the
            entry could not be read); nothing changed.
        asyncpg.PostgresError: Postgres refused the record again (the cause is not fixed);
            nothing changed. Postgres unreachable: ``POSTGRES_UNAVAILABLE``.
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM settlement_dead_letters WHERE stream_entry_id = $1 FOR UPDATE",
            stream_entry_id,
        )
        if row is None:
            raise DeadLetterNotFoundError(stream_entry_id)
        letter = DeadLetter(*row)
        if letter.replayed_at is not None:
            return Replay(letter, ReplayOutcome.ALREADY_REPLAYED)
        posting = None
        if letter.request_id is not None and await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM usage_events WHERE request_id = $1)", letter.request_id
        ):
            outcome = ReplayOutcome.ALREADY_POSTED
        else:
            if letter.charged_millicredits is None:
                raise ValueError(f"dead letter {stream_entry_id} has no readable charge")
            row_json = posting_row(letter.payload, charged_millicredits=letter.charged_millicredits)
            (posting,) = await post_settlements(conn, f"[{row_json}]")
            # Posted meanwhile by a poster that met the entry again: post_settlements skips it.
            outcome = ReplayOutcome.POSTED if posting.posted else ReplayOutcome.ALREADY_POSTED
        replayed_at = await conn.fetchval(
            "UPDATE settlement_dead_letters SET replayed_at = now()"
            " WHERE stream_entry_id = $1 RETURNING replayed_at",
            stream_entry_id,
        )
    return Replay(dataclasses.replace(letter, replayed_at=replayed_at), outcome, posting)
