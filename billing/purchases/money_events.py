"""The money a purchase change moved, named for metrics and logs.

``billing.purchases.purchase_ledger`` posts a purchase's entries; this module reads the entries
one change created (``PurchaseUpdate.entries``) and says what they were: a fulfilment (the
``purchase`` entry) or a reversal of a refund or a dispute (``reversal`` entries keyed by
``REFUND_KEY_PREFIX`` / ``DISPUTE_KEY_PREFIX``). ``log_money_events`` writes one log line per
such entry (``purchase.fulfilled``, ``purchase.reversed``) with the ids an operator needs,
amounts as strings, never a payload. ``PurchaseStats`` counts the fulfilments for metrics.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from billing.ledger import LedgerEntry
from billing.purchases.purchase_ledger import DISPUTE_KEY_PREFIX, REFUND_KEY_PREFIX
from billing.purchases.purchase_records import PurchaseUpdate

log = logging.getLogger(__name__)

#: The kinds of reversal (the ``kind`` label of ``creditgate_reversed_millicredits_total``).
REVERSAL_KINDS = ("refund", "dispute")


def reversal_kind(entry: LedgerEntry) -> str | None:
    """``refund`` or ``dispute`` for a ``reversal`` entry of a purchase's refund or dispute
    (either sign: taking credits back or restoring them), else None."""
    if entry.entry_type != "reversal":
        return None
    if entry.idempotency_key.startswith(REFUND_KEY_PREFIX):
        return "refund"
    if entry.idempotency_key.startswith(DISPUTE_KEY_PREFIX):
        return "dispute"
    return None


def log_money_events(update: PurchaseUpdate, *, stripe_event_id: str | None) -> None:
    """One ``purchase.fulfilled`` or ``purchase.reversed`` line per entry the update created.

    Args:
        stripe_event_id: the webhook event that made the change; None for a success return
            (the Checkout Session is named instead).
    """
    purchase = update.purchase
    if purchase is None:
        return
    for entry in update.entries:
        kind = reversal_kind(entry)
        if entry.entry_type == "purchase":
            name, message = "purchase.fulfilled", "purchase fulfilled"
        elif kind is not None:
            name, message = "purchase.reversed", f"purchase {kind} reversal posted"
        else:
            continue
        log.info(
            message,
            extra={
                "event": name,
                "accountId": purchase.account_id,
                "purchaseId": purchase.public_id,
                "packageCode": purchase.package_code,
                "kind": kind,
                "millicredits": str(entry.amount_millicredits),
                "balanceAfterMillicredits": str(entry.balance_after_millicredits),
                "ledgerEntryId": entry.id,
                "stripeEventId": stripe_event_id,
                "checkoutSessionId": purchase.checkout_session_id,
            },
        )


@dataclass(slots=True)
class PurchaseStats:
    """Purchases fulfilled in this process, whichever path fulfilled them first (the webhook
    or the gateway's success return: the ``purchase`` entry is created once, so each purchase
    counts once). One per process, shared by both apps (``runtime.appkeys.PURCHASE_STATS``);
    exported by the admin service (``creditgate_purchases_total``,
    ``creditgate_purchased_millicredits_total``, the fulfilment latency histogram).

    Attributes:
        purchases: purchases fulfilled, by package code.
        purchased_millicredits: the credits those purchases granted, by package code.
        on_fulfilment: called with each fulfilment's seconds from the Checkout Session's
            ``created`` (a histogram's ``observe``), when set.
    """

    purchases: Counter[str] = field(default_factory=Counter)
    purchased_millicredits: Counter[str] = field(default_factory=Counter)
    on_fulfilment: Callable[[float], None] | None = None

    def record(self, update: PurchaseUpdate, session_created: object, now_s: float) -> None:
        """Count the fulfilment ``update`` made, if it made one (its ``purchase`` entry).

        Args:
            session_created: the Checkout Session's ``created`` (Unix time; anything else:
                no latency observed).
            now_s: now, Unix time.
        """
        purchase = update.purchase
        if purchase is None:
            return
        for entry in update.entries:
            if entry.entry_type != "purchase":
                continue
            self.purchases[purchase.package_code] += 1
            self.purchased_millicredits[purchase.package_code] += entry.amount_millicredits
            if (
                self.on_fulfilment is not None
                and isinstance(session_created, int)
                and not isinstance(session_created, bool)
            ):
                self.on_fulfilment(max(0.0, now_s - session_created))
