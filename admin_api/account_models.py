"""JSON models of accounts, keys, ledger entries and usage events in the admin API.

Money: millicredits as strings with display numbers beside them, as ``billing.units
.money_fields`` writes them (``balanceMillicredits``, ``balanceCredits``, ``balanceUsd``).
Spend caps in requests are decimal credit strings (``"12.5"``, up to 3 decimals); rates in
usage rows are credits per 1k tokens with 3 decimals (``"2.400"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from admin_api.framework import AdminModel
from billing.api_keys import ApiKeyRecord
from billing.ledger import LedgerEntry, UsageEvent
from billing.spend_controls import Limits
from billing.units import credits_text, credits_to_millicredits, money_fields

#: A non-negative amount of credits as a decimal string, up to 3 decimals and 10^12 credits
#: (so its millicredits fit a bigint with room for sums).
CreditsAmount = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,12}(\.[0-9]{1,3})?$")]
#: A model name in an allow list.
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]
#: A reason an operator gives: required, no NUL.
Reason = Annotated[str, StringConstraints(min_length=1, max_length=1000, pattern=r"^[^\x00]+$")]


def millicredits_or_none(credits: str | None) -> int | None:
    """A ``CreditsAmount`` (or None) as millicredits."""
    return None if credits is None else credits_to_millicredits(credits)


def money(prefix: str, amount_millicredits: int | None) -> dict[str, Any]:
    """``money_fields``, or its keys with None for no amount (e.g. no cap)."""
    fields = money_fields(prefix, amount_millicredits or 0)
    return fields if amount_millicredits is not None else dict.fromkeys(fields)


class ControlsIn(AdminModel):
    """Spend controls in a request; in a PATCH, an absent field is unchanged and null
    removes the cap (or the model list: every model)."""

    daily_spend_cap_credits: CreditsAmount | None = None
    monthly_spend_cap_credits: CreditsAmount | None = None
    max_request_credits: CreditsAmount | None = None
    allowed_models: Annotated[list[ModelName], Field(max_length=200)] | None = None

    def control_changes(self, fields: set[str] | None = None) -> dict[str, Any]:
        """Column name -> value for the controls given (``fields``: those set; default all)."""
        given = self.model_fields_set if fields is None else fields
        columns = {
            "daily_spend_cap_credits": "daily_spend_cap_millicredits",
            "monthly_spend_cap_credits": "monthly_spend_cap_millicredits",
            "max_request_credits": "max_request_millicredits",
        }
        changes: dict[str, Any] = {
            column: millicredits_or_none(getattr(self, name))
            for name, column in columns.items()
            if name in given
        }
        if "allowed_models" in given:
            models = self.allowed_models
            changes["allowed_models"] = None if models is None else list(models)
        return changes

    def controls(self) -> Limits:
        """The controls as given (absent: none)."""
        changes = self.control_changes(set(type(self).model_fields))
        models = changes["allowed_models"]
        return Limits(
            daily_spend_cap_millicredits=changes["daily_spend_cap_millicredits"],
            monthly_spend_cap_millicredits=changes["monthly_spend_cap_millicredits"],
            max_request_millicredits=changes["max_request_millicredits"],
            allowed_models=None if models is None else frozenset(models),
        )


class ControlsOut(AdminModel):
    """Spend controls as stored; null is no cap (``allowedModels`` null: every model)."""

    daily_spend_cap_millicredits: str | None
    daily_spend_cap_credits: float | None
    daily_spend_cap_usd: float | None
    monthly_spend_cap_millicredits: str | None
    monthly_spend_cap_credits: float | None
    monthly_spend_cap_usd: float | None
    max_request_millicredits: str | None
    max_request_credits: float | None
    max_request_usd: float | None
    allowed_models: list[str] | None


def controls_fields(controls: Limits) -> dict[str, Any]:
    """The ``ControlsOut`` fields (camelCase) of stored controls."""
    models = controls.allowed_models
    return {
        **money("dailySpendCap", controls.daily_spend_cap_millicredits),
        **money("monthlySpendCap", controls.monthly_spend_cap_millicredits),
        **money("maxRequest", controls.max_request_millicredits),
        "allowedModels": None if models is None else sorted(models),
    }


class _KeyFields(AdminModel):
    """A key's own fields (before its controls in the JSON)."""

    id: int
    account_id: int
    key_prefix: str = Field(description="The key's first 12 characters.")
    name: str
    created_at: datetime
    last_used_at: datetime | None = Field(description="When its newest usage event finished.")
    expires_at: datetime | None
    revoked_at: datetime | None
    requests_per_minute: int | None


class KeyOut(ControlsOut, _KeyFields):
    """An API key as listed (never the key itself)."""

    @classmethod
    def of(cls, record: ApiKeyRecord) -> KeyOut:
        """The JSON form of a stored key."""
        return cls.model_validate(
            {
                "id": record.id,
                "accountId": record.account_id,
                "keyPrefix": record.key_prefix,
                "name": record.name,
                "createdAt": record.created_at,
                "lastUsedAt": record.last_used_at,
                "expiresAt": record.expires_at,
                "revokedAt": record.revoked_at,
                "requestsPerMinute": record.requests_per_minute,
                **controls_fields(record.controls),
            }
        )


class LedgerEntryOut(AdminModel):
    """One ledger entry: ``amount`` is signed (credits in > 0)."""

    id: int
    account_id: int
    entry_type: str
    amount_millicredits: str
    amount_credits: float
    amount_usd: float
    balance_after_millicredits: str
    balance_after_credits: float
    balance_after_usd: float
    idempotency_key: str
    reference: str | None
    reverses_entry_id: int | None
    created_at: datetime

    @classmethod
    def of(cls, entry: LedgerEntry) -> LedgerEntryOut:
        """The JSON form of a ledger entry."""
        return cls.model_validate(
            {
                "id": entry.id,
                "accountId": entry.account_id,
                "entryType": entry.entry_type,
                **money_fields("amount", entry.amount_millicredits),
                **money_fields("balanceAfter", entry.balance_after_millicredits),
                "idempotencyKey": entry.idempotency_key,
                "reference": entry.reference,
                "reversesEntryId": entry.reverses_entry_id,
                "createdAt": entry.created_at,
            }
        )


class UsageOut(AdminModel):
    """One billed request, with the rates in force when it happened (credits per 1k
    tokens, 3 decimals)."""

    id: int
    request_id: str
    account_id: int
    api_key_id: int | None
    model: str
    endpoint: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    rate_card_id: int | None
    input_credits_per_1k_tokens: str = Field(alias="inputCreditsPer1kTokens")
    cached_input_credits_per_1k_tokens: str = Field(alias="cachedInputCreditsPer1kTokens")
    output_credits_per_1k_tokens: str = Field(alias="outputCreditsPer1kTokens")
    rounding_mode: str
    cost_millicredits: str
    cost_credits: float
    cost_usd: float
    charged_millicredits: str
    charged_credits: float
    charged_usd: float
    shortfall_millicredits: str
    shortfall_credits: float
    shortfall_usd: float
    usage_source: str
    status: str
    started_at: datetime
    finished_at: datetime

    @classmethod
    def of(cls, event: UsageEvent) -> UsageOut:
        """The JSON form of a usage event."""
        values: Mapping[str, Any] = {
            "id": event.id,
            "requestId": event.request_id,
            "accountId": event.account_id,
            "apiKeyId": event.api_key_id,
            "model": event.model,
            "endpoint": event.endpoint,
            "promptTokens": event.prompt_tokens,
            "cachedTokens": event.cached_tokens,
            "completionTokens": event.completion_tokens,
            "rateCardId": event.rate_card_id,
            "inputCreditsPer1kTokens": credits_text(event.input_millicredits_per_1k_tokens),
            "cachedInputCreditsPer1kTokens": credits_text(
                event.cached_input_millicredits_per_1k_tokens
            ),
            "outputCreditsPer1kTokens": credits_text(event.output_millicredits_per_1k_tokens),
            "roundingMode": event.rounding_mode,
            **money_fields("cost", event.cost_millicredits),
            **money_fields("charged", event.charged_millicredits),
            **money_fields("shortfall", event.shortfall_millicredits),
            "usageSource": event.usage_source,
            "status": event.status,
            "startedAt": event.started_at,
            "finishedAt": event.finished_at,
        }
        return cls.model_validate(values)
