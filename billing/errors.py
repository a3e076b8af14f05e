"""The billing package's exception hierarchy. HTTP layers map these by class."""

from __future__ import annotations

from typing import Final

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

REDIS_UNAVAILABLE: Final = (RedisConnectionError, RedisTimeoutError, OSError)
"""What redis-py raises when Redis is unreachable or does not answer in time (a reset socket
is an ``OSError``): callers on a request path answer 503."""

POSTGRES_REFUSED_INPUT: Final = (asyncpg.DataError,)
"""Postgres refused a value the statement was given (SQLSTATE class 22, or asyncpg's own
check of an argument): a NUL byte in text (22021 ``CharacterNotInRepertoireError``), a number
out of range, a malformed date. On a request path that value came from the caller: the HTTP
layers answer 400 ``invalid_request_error`` (``runtime.errors``), not 503. Not part of
``POSTGRES_UNAVAILABLE``: the same value fails again however often it is retried."""

POSTGRES_UNAVAILABLE: Final = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    *(
        cls
        for cls in asyncpg.PostgresError.__subclasses__()
        if not issubclass(cls, POSTGRES_REFUSED_INPUT)
    ),
)
"""What asyncpg raises when Postgres is unreachable, restarting or refusing a statement: a
refused connect (``OSError``), a server error (every ``PostgresError`` class but the refused
input ones, ``POSTGRES_REFUSED_INPUT``; a backend terminated under a pooled connection is its
``ConnectionDoesNotExistError``, an unknown SQLSTATE its ``UnknownPostgresError``), a
connection closed under the caller (``InterfaceError``) or a connection left in a state
asyncpg cannot use (``InternalClientError``, which subclasses none of the others). Catch this
tuple, never a hand-written copy of it."""

POSTGRES_REFUSED_DATA: Final = (
    *POSTGRES_REFUSED_INPUT,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.NoDataFoundError,
)
"""The statement's data at fault, not the server: a value out of range or malformed
(SQLSTATE class 22, ``POSTGRES_REFUSED_INPUT``), a constraint or reference violated
(class 23; ``usage_events_check_references`` raises 23503 for an unknown account, API key or
rate card), an unknown account in ``post_ledger_entries`` (P0002). The same data fails again
however often it is retried; catch this before ``POSTGRES_UNAVAILABLE`` (which holds all
but the first)."""


class BillingError(Exception):
    """Base class of every error raised by ``billing``."""


class InsufficientCreditsError(BillingError):
    """Available balance is below the request's worst-case cost (HTTP 402).

    Attributes:
        required_millicredits: the hold that was asked for.
        available_millicredits: posted balance minus open holds and unposted settlements.
    """

    def __init__(self, *, required_millicredits: int, available_millicredits: int) -> None:
        super().__init__(
            f"insufficient credits: required {required_millicredits} mc, "
            f"available {available_millicredits} mc"
        )
        self.required_millicredits = required_millicredits
        self.available_millicredits = available_millicredits


class AccountSuspendedError(BillingError):
    """Paid use is stopped for the account (an outstanding shortfall); HTTP 402."""

    def __init__(self, *, account_id: int, shortfall_millicredits: int) -> None:
        super().__init__(f"account {account_id} has an outstanding shortfall")
        self.account_id = account_id
        self.shortfall_millicredits = shortfall_millicredits


class BillingUnavailableError(BillingError):
    """Redis or Postgres is unreachable; money fails closed (HTTP 503)."""


class UnknownModelError(BillingError):
    """No rate card is in force for the model, or it is not allowed (HTTP 404)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.")
        self.model = model


class ModelNotServedError(UnknownModelError):
    """The model's rate card is of another kind than the endpoint serves, e.g. a chat model on
    ``/v1/embeddings`` (HTTP 404, as OpenAI answers; nothing is held or forwarded).

    Attributes:
        model_kind: what the model is (``chat``, ``completion``, ``embedding``).
        endpoint_path: the route it was sent to, e.g. ``/v1/embeddings``.
    """

    def __init__(self, model: str, *, model_kind: str, endpoint_path: str) -> None:
        super().__init__(model)
        self.args = (
            f"The model `{model}` is a {model_kind} model and is not supported on {endpoint_path}.",
        )
        self.model_kind = model_kind
        self.endpoint_path = endpoint_path


class AccountNotFoundError(BillingError):
    """No account with that id."""

    def __init__(self, account_id: int) -> None:
        super().__init__(f"account {account_id} not found")
        self.account_id = account_id


class DeadLetterNotFoundError(BillingError):
    """No dead-lettered settlement for that outbox stream entry id."""

    def __init__(self, stream_entry_id: str) -> None:
        super().__init__(f"no dead-lettered settlement for outbox entry {stream_entry_id}")
        self.stream_entry_id = stream_entry_id


class NegativeBalanceError(BillingError):
    """A ledger entry would take a balance below zero and was not written."""

    def __init__(self, *, account_id: int, balance_millicredits: int, amount_millicredits: int):
        super().__init__(
            f"entry of {amount_millicredits} mc would take account {account_id} below zero "
            f"(balance {balance_millicredits} mc)"
        )
        self.account_id = account_id
        self.balance_millicredits = balance_millicredits
        self.amount_millicredits = amount_millicredits


class DuplicateAccountError(BillingError):
    """Another account already has this email or external id (HTTP 409).

    Attributes:
        field: ``"email"`` or ``"external_id"``.
    """

    def __init__(self, field: str) -> None:
        super().__init__(f"another account has this {field.replace('_', ' ')}")
        self.field = field


class ApiKeyNotFoundError(BillingError):
    """No API key with that id."""

    def __init__(self, api_key_id: int) -> None:
        super().__init__(f"API key {api_key_id} not found")
        self.api_key_id = api_key_id


class IdempotencyKeyReusedError(BillingError):
    """An idempotency key was posted before with other content (HTTP 409); nothing written."""

    def __init__(self, idempotency_key: str) -> None:
        super().__init__(
            f"idempotency key {idempotency_key!r} was used before for a different request"
        )
        self.idempotency_key = idempotency_key


class NoShortfallError(BillingError):
    """A shortfall was to be forgiven, but the account owes nothing (HTTP 422)."""

    def __init__(self, account_id: int) -> None:
        super().__init__(f"account {account_id} has no outstanding shortfall")
        self.account_id = account_id


class AccountDeactivatedError(BillingError):
    """An operator suspended the account: every billed request of its keys is refused
    (HTTP 403 ``account_deactivated``), nothing held or forwarded."""

    def __init__(self, account_id: int) -> None:
        super().__init__(f"account {account_id} is suspended")
        self.account_id = account_id


class ModelNotAllowedError(BillingError):
    """The model is not in the key's or the account's allow list (HTTP 403
    ``model_not_allowed``); nothing held or forwarded.

    Attributes:
        holder: ``key`` or ``account``: whose list refused it.
    """

    def __init__(self, model: str, *, holder: str) -> None:
        super().__init__(f"The model `{model}` is not in this {holder}'s allowed models.")
        self.model = model
        self.holder = holder


class SpendCapExceededError(BillingError):
    """The request would pass a spend cap (HTTP 402 ``spend_cap_exceeded``); nothing held
    or forwarded.

    Attributes:
        cap: a ``billing.spend_controls.SpendCap`` value (``key_daily``, ...).
        cap_millicredits: the cap.
        spent_millicredits: the window's spend so far (holds and charges); 0 for a
            per-request cap.
        required_millicredits: the request's hold.
        resets_at_ms: when the window ends (Unix ms); None for a per-request cap.
    """

    def __init__(
        self,
        *,
        cap: str,
        cap_millicredits: int,
        spent_millicredits: int,
        required_millicredits: int,
        resets_at_ms: int | None,
    ) -> None:
        super().__init__(
            f"{cap} spend cap of {cap_millicredits} mc would be exceeded "
            f"(spent {spent_millicredits} mc, required {required_millicredits} mc)"
        )
        self.cap = cap
        self.cap_millicredits = cap_millicredits
        self.spent_millicredits = spent_millicredits
        self.required_millicredits = required_millicredits
        self.resets_at_ms = resets_at_ms


class RateLimitedError(BillingError):
    """The key made its ``requests_per_minute`` requests in the last 60 s (HTTP 429
    ``rate_limit_exceeded`` with ``Retry-After``).

    Attributes:
        limit: the key's requests per minute.
        retry_after_ms: when the oldest counted request leaves the window.
    """

    def __init__(self, *, limit: int, retry_after_ms: int) -> None:
        super().__init__(f"rate limit of {limit} requests per minute reached")
        self.limit = limit
        self.retry_after_ms = retry_after_ms
