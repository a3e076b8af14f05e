-- The money path: accounts, API keys, rate cards, the append-only ledger and usage events.
-- Amounts are integer millicredits (1 credit = 1,000 mc; $1.00 = 1,000 credits).
--
-- Tables, constraints, indexes, roles and grants only. Functions and the triggers that bind
-- them live in migrations/functions/ (one file per function, re-applied when it changes):
--   ledger_entries_append_only         ledger_entries refuses UPDATE, DELETE, TRUNCATE
--   usage_events_check_references      usage_events' references, checked per statement
--   refuse_delete_of_referenced_rows   accounts, API keys and rate cards are never deleted
--   post_ledger_entries                the only writer of ledger entries and balances

CREATE TABLE accounts (
    id                      bigserial PRIMARY KEY,
    email                   text NOT NULL UNIQUE,
    -- Posted balance, kept beside the ledger and updated in the same transaction as each entry.
    balance_millicredits    bigint NOT NULL DEFAULT 0 CHECK (balance_millicredits >= 0),
    -- Bumped by every ledger write; Redis only ever applies (balance, version) pairs if newer.
    balance_version         bigint NOT NULL DEFAULT 0,
    -- Reversals (refunds, chargebacks) of credits already spent; while > 0, paid use stops.
    -- (Usage that the balance could not cover is recorded on its usage event instead.)
    shortfall_millicredits  bigint NOT NULL DEFAULT 0 CHECK (shortfall_millicredits >= 0),
    created_at              timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id            bigserial PRIMARY KEY,
    account_id    bigint NOT NULL REFERENCES accounts (id),
    -- Only the SHA-256 digest of the key is stored; the prefix is shown to humans.
    key_digest    bytea NOT NULL UNIQUE CHECK (octet_length(key_digest) = 32),
    key_prefix    text NOT NULL,
    name          text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    expires_at    timestamptz
);
CREATE INDEX api_keys_account_id_idx ON api_keys (account_id);

-- Versioned per-model prices: the row in force for a model is the newest with effective_at <= now().
CREATE TABLE rate_cards (
    id                                   bigserial PRIMARY KEY,
    model                                text NOT NULL,
    -- What the model serves, so each endpoint takes only its own kind: chat.completions and
    -- responses 'chat', completions 'completion', embeddings 'embedding'.
    model_kind                           text NOT NULL CHECK (model_kind IN
                                           ('chat', 'completion', 'embedding')),
    input_millicredits_per_1k_tokens     bigint NOT NULL CHECK (input_millicredits_per_1k_tokens >= 0),
    cached_input_millicredits_per_1k_tokens bigint CHECK (cached_input_millicredits_per_1k_tokens >= 0),
    output_millicredits_per_1k_tokens    bigint NOT NULL CHECK (output_millicredits_per_1k_tokens >= 0),
    max_output_tokens                    integer NOT NULL CHECK (max_output_tokens > 0),
    -- What the upstream charges us, in micro-USD per 1k tokens, for margin metrics.
    upstream_input_microusd_per_1k_tokens   bigint NOT NULL DEFAULT 0,
    upstream_output_microusd_per_1k_tokens  bigint NOT NULL DEFAULT 0,
    effective_at                         timestamptz NOT NULL DEFAULT now(),
    created_at                           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (model, effective_at)
);

-- Append-only (functions/ledger_entries_append_only.sql): corrections are new entries.
-- Written only by post_ledger_entries (functions/post_ledger_entries.sql).
CREATE TABLE ledger_entries (
    id                              bigserial PRIMARY KEY,
    account_id                      bigint NOT NULL REFERENCES accounts (id),
    entry_type                      text NOT NULL CHECK (entry_type IN
                                      ('purchase', 'deduction', 'refund', 'adjustment', 'reversal')),
    amount_millicredits             bigint NOT NULL,
    balance_after_millicredits      bigint NOT NULL CHECK (balance_after_millicredits >= 0),
    idempotency_key                 text NOT NULL UNIQUE,
    reference                       text,
    -- Set on reversal entries: the entry being (partly) reversed.
    reverses_entry_id               bigint REFERENCES ledger_entries (id),
    created_at                      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_account_id_idx ON ledger_entries (account_id, id);

-- One row per settled request, written by post_settlements (functions/post_settlements.sql).
--
-- account_id, api_key_id and rate_card_id carry no foreign keys: the settlement poster inserts
-- usage rows 500 at a time, and a foreign key runs one lookup-and-lock query per row and
-- reference. Instead:
-- * a statement trigger (functions/usage_events_check_references.sql) refuses, with
--   foreign_key_violation (23503), any statement whose rows name an account, API key or
--   rate card that does not exist, checking each distinct id once;
-- * a referenced row never disappears: accounts, API keys and rate cards are never deleted
--   (functions/refuse_delete_of_referenced_rows.sql; a key is revoked, a rate card superseded).
-- ledger_entries keeps its foreign key to accounts.
CREATE TABLE usage_events (
    id                          bigserial PRIMARY KEY,
    request_id                  text NOT NULL UNIQUE,
    account_id                  bigint NOT NULL,
    api_key_id                  bigint,
    model                       text NOT NULL,
    endpoint                    text NOT NULL,
    prompt_tokens               integer NOT NULL DEFAULT 0,
    cached_tokens               integer NOT NULL DEFAULT 0,
    completion_tokens           integer NOT NULL DEFAULT 0,
    -- Snapshot of the rate card applied.
    rate_card_id                bigint,
    input_millicredits_per_1k_tokens        bigint NOT NULL,
    cached_input_millicredits_per_1k_tokens bigint NOT NULL,
    output_millicredits_per_1k_tokens       bigint NOT NULL,
    rounding_mode               text NOT NULL CHECK (rounding_mode IN ('exact', 'ceil')),
    -- What the usage cost at the rate card, and what was collected (min of cost and balance).
    cost_millicredits           bigint NOT NULL CHECK (cost_millicredits >= 0),
    charged_millicredits        bigint NOT NULL CHECK (charged_millicredits >= 0),
    shortfall_millicredits      bigint NOT NULL DEFAULT 0 CHECK (shortfall_millicredits >= 0),
    hold_millicredits           bigint NOT NULL DEFAULT 0,
    usage_source                text NOT NULL CHECK (usage_source IN ('upstream', 'estimated')),
    status                      text NOT NULL CHECK (status IN ('completed', 'client_disconnected',
                                                                 'upstream_error', 'uncharged')),
    started_at                  timestamptz NOT NULL,
    finished_at                 timestamptz NOT NULL,
    upstream_latency_ms         integer,
    recorded_at                 timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_events_account_id_idx ON usage_events (account_id, id);

-- The application's role may read and append, never rewrite history.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'creditgate_app') THEN
        CREATE ROLE creditgate_app NOLOGIN;
    END IF;
END;
$$;
GRANT SELECT, INSERT, UPDATE ON accounts, api_keys, rate_cards, usage_events TO creditgate_app;
GRANT SELECT, INSERT ON ledger_entries TO creditgate_app;
REVOKE UPDATE, DELETE, TRUNCATE ON ledger_entries FROM creditgate_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO creditgate_app;
