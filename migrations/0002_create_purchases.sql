-- Buying credits through Stripe Checkout: packages, purchases, the Stripe events seen, and
-- the refunds and disputes reported against purchases.
-- Credits are integer millicredits (1 credit = 1,000 mc). Prices and Stripe amounts are in the
-- currency's minor units (cents for USD), as Stripe gives them: `*_minor_units`.

-- What a user can buy. The server alone maps a code to a price and credits; the total is
-- stored as a fixed number, never recomputed from a bonus percentage.
CREATE TABLE packages (
    id                  bigserial PRIMARY KEY,
    code                text NOT NULL UNIQUE CHECK (code ~ '^[a-z][a-z0-9_-]{0,39}$'),
    name                text NOT NULL,
    price_minor_units   integer NOT NULL CHECK (price_minor_units > 0),
    currency            text NOT NULL DEFAULT 'usd' CHECK (currency ~ '^[a-z]{3}$'),
    base_millicredits   bigint NOT NULL CHECK (base_millicredits > 0),
    bonus_millicredits  bigint NOT NULL DEFAULT 0 CHECK (bonus_millicredits >= 0),
    total_millicredits  bigint NOT NULL,
    -- A Stripe Price (price_...) to charge; NULL: Checkout gets inline price_data instead.
    stripe_price_id     text,
    active              boolean NOT NULL DEFAULT true,
    sort_order          integer NOT NULL DEFAULT 0,
    badge               text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (total_millicredits = base_millicredits + bonus_millicredits)
);

-- The catalogue as of this migration (billing.purchases.packages.DEFAULT_PACKAGES holds the same rows).
INSERT INTO packages (code, name, price_minor_units, currency, base_millicredits,
                      bonus_millicredits, total_millicredits, sort_order, badge)
VALUES ('starter', 'Starter', 999, 'usd', 9990000, 0, 9990000, 10, NULL),
       ('professional', 'Professional', 4999, 'usd', 49990000, 2500000, 52490000, 20, NULL),
       ('enterprise', 'Enterprise', 9999, 'usd', 99990000, 10000000, 109990000, 30, 'Best value');

-- One purchase attempt: created pending when the user starts Checkout, then moved by Stripe's
-- events (and the success return). Price and credits are snapshots taken at creation.
--   pending     Checkout Session created (or being created), nothing paid yet
--   processing  Checkout completed, an asynchronous payment (bank debit, ...) is under way
--   paid        the money arrived; the purchase ledger entry exists (purchase_entry_id)
--   failed      the asynchronous payment failed, or Checkout could not be started
--   expired     the Checkout Session expired unpaid
--   needs_review  Stripe reported an amount or currency other than the snapshot: no credits,
--                 an admin decides
CREATE TABLE purchases (
    id                      bigserial PRIMARY KEY,
    -- Unguessable id shown to users and sent to Stripe as metadata.purchase_id.
    public_id               text NOT NULL UNIQUE,
    account_id              bigint NOT NULL REFERENCES accounts (id),
    package_id              bigint NOT NULL REFERENCES packages (id),
    package_code            text NOT NULL,
    price_minor_units       integer NOT NULL CHECK (price_minor_units > 0),
    currency                text NOT NULL,
    total_millicredits      bigint NOT NULL CHECK (total_millicredits > 0),
    -- Path on our own site to offer after the return from Checkout ("/..."), or NULL.
    return_path             text,
    status                  text NOT NULL DEFAULT 'pending' CHECK (status IN
                              ('pending', 'processing', 'paid', 'failed', 'expired',
                               'needs_review')),
    failure_reason          text,
    checkout_session_id     text UNIQUE,
    checkout_url            text,
    payment_intent_id       text UNIQUE,
    charge_id               text,
    receipt_url             text,
    amount_paid_minor_units integer,
    purchase_entry_id       bigint REFERENCES ledger_entries (id),
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    paid_at                 timestamptz
);
CREATE INDEX purchases_account_id_idx ON purchases (account_id, id);
CREATE INDEX purchases_charge_id_idx ON purchases (charge_id) WHERE charge_id IS NOT NULL;

-- Every Stripe event id ever accepted; a repeat delivery finds its row and changes nothing.
-- Payloads are not stored (they carry customers' personal data); the facts they carried are
-- in purchases, purchase_refunds and purchase_disputes.
CREATE TABLE stripe_events (
    event_id            text PRIMARY KEY,
    event_type          text NOT NULL,
    object_id           text,
    livemode            boolean NOT NULL DEFAULT false,
    stripe_created_at   timestamptz,
    -- processed: it changed or confirmed a purchase; ignored: handled type, not one of ours;
    -- unhandled: a type this service does not act on; rejected: needs an admin (logged).
    outcome             text NOT NULL DEFAULT 'processed' CHECK (outcome IN
                          ('processed', 'ignored', 'unhandled', 'rejected')),
    purchase_id         bigint REFERENCES purchases (id),
    received_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_events_received_at_idx ON stripe_events (received_at);

-- Refunds as Stripe reported them, one row per refund id however many events carried it.
-- purchase_id is NULL while the refund's payment intent matches no known purchase (a refund
-- event delivered before the checkout event); fulfilment adopts such rows.
CREATE TABLE purchase_refunds (
    refund_id               text PRIMARY KEY,
    purchase_id             bigint REFERENCES purchases (id),
    payment_intent_id       text,
    charge_id               text,
    amount_minor_units      integer NOT NULL CHECK (amount_minor_units >= 0),
    currency                text NOT NULL,
    -- Stripe's refund status: pending, requires_action, succeeded, failed, canceled.
    status                  text NOT NULL,
    stripe_created_at       timestamptz,
    -- Credits reversed for this refund and the part the balance could not cover.
    reversal_millicredits   bigint,
    shortfall_millicredits  bigint NOT NULL DEFAULT 0 CHECK (shortfall_millicredits >= 0),
    first_seen_at           timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX purchase_refunds_purchase_id_idx ON purchase_refunds (purchase_id);
CREATE INDEX purchase_refunds_orphan_pi_idx ON purchase_refunds (payment_intent_id)
    WHERE purchase_id IS NULL;
CREATE INDEX purchase_refunds_orphan_charge_idx ON purchase_refunds (charge_id)
    WHERE purchase_id IS NULL;

-- Disputes (chargebacks and inquiries), one row per dispute id.
CREATE TABLE purchase_disputes (
    dispute_id              text PRIMARY KEY,
    purchase_id             bigint REFERENCES purchases (id),
    payment_intent_id       text,
    charge_id               text,
    amount_minor_units      integer NOT NULL CHECK (amount_minor_units >= 0),
    currency                text NOT NULL,
    -- Stripe's dispute status (needs_response, under_review, won, lost, warning_*, ...).
    status                  text NOT NULL,
    reason                  text,
    stripe_created_at       timestamptz,
    held_millicredits       bigint,
    shortfall_millicredits  bigint NOT NULL DEFAULT 0 CHECK (shortfall_millicredits >= 0),
    first_seen_at           timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX purchase_disputes_purchase_id_idx ON purchase_disputes (purchase_id);
CREATE INDEX purchase_disputes_orphan_pi_idx ON purchase_disputes (payment_intent_id)
    WHERE purchase_id IS NULL;
CREATE INDEX purchase_disputes_orphan_charge_idx ON purchase_disputes (charge_id)
    WHERE purchase_id IS NULL;

GRANT SELECT, INSERT, UPDATE ON packages, purchases, stripe_events, purchase_refunds,
    purchase_disputes TO creditgate_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO creditgate_app;
