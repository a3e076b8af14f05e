"""Base models of the admin API's JSON, and cursor pagination.

- ``AdminModel``: camelCase JSON keys (``balanceMillicredits``), unknown keys refused, Python
  attributes in snake_case. Every body, query and response model derives from it.
- ``Page``: the query of a listing, ``?limit=`` (1..200, default 50) and ``?cursor=`` (opaque);
  ``Paginated[Item]``: its answer, ``{"data": [...], "nextCursor": str | null}``.
- Cursors are keyset cursors: the URL-safe base64 of the last row's id. A listing fetches
  ``limit + 1`` rows below ``page.after_id`` and passes them to ``page.window``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Generic, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic.alias_generators import to_camel

#: The largest id Postgres's bigint holds; path and query ids are bounded by it.
MAX_ID = 2**63 - 1

#: A row id: a positive bigint.
Id = Annotated[int, Field(ge=1, le=MAX_ID)]


class AdminModel(BaseModel):
    """Base of the admin API's models: camelCase aliases, unknown keys refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class IdPath(AdminModel):
    """The path of a route on one row: ``/admin/v1/<things>/{id}``."""

    id: Id


def encode_cursor(last_id: int) -> str:
    """The opaque cursor after the row ``last_id`` (URL-safe base64, unpadded)."""
    return base64.urlsafe_b64encode(str(last_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The row id inside a cursor made by ``encode_cursor``.

    Raises:
        ValueError: not such a cursor (pydantic answers it as a 400 naming ``cursor``).
    """
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not a cursor this API made") from None
    if not text.isdigit() or not 1 <= int(text) <= MAX_ID or text != str(int(text)):
        raise ValueError("not a cursor this API made")
    return int(text)


_Row = TypeVar("_Row")


class Page(AdminModel):
    """The query of a listing (subclass it to add filters)."""

    limit: int = Field(50, ge=1, le=200, description="Rows per page (1..200).")
    cursor: str | None = Field(
        None, max_length=64, description="Opaque: the `nextCursor` of the previous page."
    )

    @field_validator("cursor")
    @classmethod
    def _check_cursor(cls, value: str | None) -> str | None:
        if value is not None:
            decode_cursor(value)
        return value

    @property
    def after_id(self) -> int | None:
        """The id the page starts after (rows with a lower id, newest first), or None."""
        return None if self.cursor is None else decode_cursor(self.cursor)

    def window(
        self, rows: Sequence[_Row], key: Callable[[_Row], int]
    ) -> tuple[list[_Row], str | None]:
        """``(the page's rows, next cursor)`` from up to ``limit + 1`` fetched rows: a
        ``limit + 1``-th row means there is a next page, which starts after the last row kept.
        """
        kept = list(rows[: self.limit])
        more = len(rows) > self.limit
        return kept, encode_cursor(key(kept[-1])) if more and kept else None


_Item = TypeVar("_Item")


class Paginated(AdminModel, Generic[_Item]):
    """One page of a listing."""

    data: list[_Item]
    next_cursor: str | None = Field(description="The `cursor` of the next page; null at the end.")


#: Free text stored in Postgres: no NUL character (Postgres text cannot hold one).
Text = Annotated[str, StringConstraints(max_length=1000, pattern=r"^[^\x00]*$")]
#: A name or label: Text up to 200 characters.
ShortText = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00]*$")]


def _iso_8601(value: object) -> datetime:
    # pydantic's lax mode would read a number (or a numeric query string) as Unix seconds,
    # and its strict mode no string at all in a query: the API's times are ISO 8601 strings.
    parsed = value if isinstance(value, datetime) else None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
    if parsed is None:
        raise ValueError(
            "expected an ISO 8601 date-time with a UTC offset, e.g. 2026-01-31T00:00:00Z"
        )
    # Years 1 and 9999 may leave Postgres's (and Python's) range once moved to UTC, and year 1
    # is Postgres's -infinity: the API takes years 1900 to 9000.
    if not 1900 <= parsed.year <= 9000:
        raise ValueError("the year must be between 1900 and 9000")
    return parsed


#: A point in time given by the client: an ISO 8601 string with its UTC offset.
Timestamp = Annotated[AwareDatetime, BeforeValidator(_iso_8601)]


def _query_bool(value: object) -> object:
    # pydantic's lax bool also takes "yes", "on", "1"...: a query flag is "true" or "false".
    if isinstance(value, str) and value not in ("true", "false"):
        raise ValueError("expected true or false")
    return value


#: A boolean query parameter: ``true`` or ``false`` only.
QueryBool = Annotated[bool, BeforeValidator(_query_bool)]
