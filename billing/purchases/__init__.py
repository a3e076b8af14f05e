"""Purchases: credit packages bought through Stripe Checkout, fulfilled exactly once, and
reversed by refunds and disputes (``purchase_ledger`` states the idempotency keys)."""
