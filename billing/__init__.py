"""Money, with no HTTP: the ledger core and two domains above it.

- core: ``units`` (millicredits), ``errors`` (the exception hierarchy, ``POSTGRES_UNAVAILABLE``),
  ``ledger`` (accounts, ``post_entry`` over the one SQL writer of entries and balances),
  ``api_keys``;
- ``billing.metering``: what a request costs and how it is charged: tokens, estimates, rate
  cards, pricing, holds in Redis (reserve / settle / void), the outbox record and its poster;
- ``billing.purchases``: buying credits: packages, Checkout Sessions, Stripe events, the
  purchase ledger and the Stripe client. It may use metering (to publish a balance to Redis);
  metering never uses it.

See docs/design.md, "Layout".
"""
