"""CSV exports of the user billing API: rows as CSV, streamed from Postgres in batches.

``stream_csv`` writes each batch of ``EXPORT_BATCH_ROWS`` rows to the client before reading
the next (keyset paging by id), so memory stays constant for any history length. Amounts
are ``billing.units.credits_text`` (exact, 3 decimals) beside a millicredits column; free
text that a spreadsheet would run as a formula is defused (``csv_text``).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from billing.errors import POSTGRES_UNAVAILABLE, BillingUnavailableError
from billing.ledger import LedgerEntry, UsageEvent
from billing.statements import Statement
from billing.units import credits_text
from runtime import appkeys

log = logging.getLogger(__name__)

#: Rows per Postgres read while streaming a CSV export.
EXPORT_BATCH_ROWS = 1000

#: A billing list function (``billing.ledger.list_usage_events``, ``list_ledger_entries``).
Lister = Callable[..., Awaitable[Sequence[Any]]]


@contextmanager
def postgres_errors_as_503() -> Iterator[None]:
    """Postgres unreachable -> ``BillingUnavailableError`` (503)."""
    try:
        yield
    except POSTGRES_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"postgres: {exc}") from exc


def csv_text(value: str | None) -> str:
    """A free-text cell, defused for spreadsheets: a leading ``= + - @`` (a formula) gets a
    ``'`` in front (OWASP's CSV injection advice). Numbers are written as they are."""
    text = value or ""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


USAGE_CSV_HEADER = (
    "id",
    "date",
    "model",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "charged_credits",
    "charged_millicredits",
    "request_id",
    "key_prefix",
    "usage_source",
)


def usage_csv_row(event: UsageEvent) -> tuple[object, ...]:
    """One usage event in the order of ``USAGE_CSV_HEADER``."""
    return (
        event.id,
        event.started_at.isoformat(),
        csv_text(event.model),
        event.prompt_tokens,
        event.cached_tokens,
        event.completion_tokens,
        credits_text(event.charged_millicredits),
        event.charged_millicredits,
        csv_text(event.request_id),
        csv_text(event.key_prefix),
        event.usage_source,
    )


LEDGER_CSV_HEADER = (
    "id",
    "date",
    "type",
    "amount_credits",
    "amount_millicredits",
    "balance_after_credits",
    "balance_after_millicredits",
    "reference",
    "receipt_url",
)


def ledger_csv_row(entry: LedgerEntry) -> tuple[object, ...]:
    """One ledger entry in the order of ``LEDGER_CSV_HEADER``."""
    return (
        entry.id,
        entry.created_at.isoformat(),
        entry.entry_type,
        credits_text(entry.amount_millicredits),
        entry.amount_millicredits,
        credits_text(entry.balance_after_millicredits),
        entry.balance_after_millicredits,
        csv_text(entry.reference),
        csv_text(entry.receipt_url),
    )


async def batches(
    request: web.Request, lister: Lister, filters: dict[str, Any]
) -> AsyncIterator[Sequence[Any]]:
    """Every matching row, newest first, ``EXPORT_BATCH_ROWS`` at a time (keyset paging:
    each read starts below the last id written, so no batch is read twice or skipped)."""
    pool = request.app[appkeys.READ_POOL]
    before_id = None
    while True:
        with postgres_errors_as_503():
            rows = await lister(pool, **filters, before_id=before_id, limit=EXPORT_BATCH_ROWS)
        yield rows
        if len(rows) < EXPORT_BATCH_ROWS:
            return
        before_id = rows[-1].id


def attachment(filename: str) -> str:
    return f'attachment; filename="{filename}"'


async def stream_csv(
    request: web.Request,
    name: str,
    header: Sequence[str],
    rows: AsyncIterator[Sequence[Any]],
    to_row: Callable[[Any], Sequence[object]],
) -> web.StreamResponse:
    """Stream ``rows`` as CSV. The first batch is read before the headers go out, so a
    Postgres that is down is still a 503; a failure later cuts the download short (the
    status is sent already) and is logged."""
    first = await anext(rows)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": attachment(f"{name}-{stamp}.csv"),
            "Cache-Control": "no-store",
        }
    )
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    batch: Sequence[Any] | None = first
    while batch is not None:
        writer.writerows(to_row(row) for row in batch)
        await response.write(buffer.getvalue().encode())
        buffer.seek(0)
        buffer.truncate()
        try:
            batch = await anext(rows)
        except StopAsyncIteration:
            batch = None
        except BillingUnavailableError:
            log.warning("%s export cut short: Postgres unreachable", name)
            response.force_close()
            return response
    await response.write_eof()
    return response


STATEMENT_CSV_HEADER = (
    "section",
    "item",
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "credits",
    "millicredits",
)


def statement_csv(statement: Statement) -> str:
    """The statement as CSV: ``summary`` rows, then one ``usage`` row per model."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(STATEMENT_CSV_HEADER)
    for label, amount in statement.summary_lines():
        writer.writerow(("summary", label, "", "", "", "", credits_text(amount), amount))
    for usage in statement.usage:
        writer.writerow(
            (
                "usage",
                csv_text(usage.model),
                usage.requests,
                usage.input_tokens,
                usage.cached_input_tokens,
                usage.output_tokens,
                credits_text(usage.charged_millicredits),
                usage.charged_millicredits,
            )
        )
    return buffer.getvalue()
