-- The admin API (docs/design.md, "Admin API"): admin tokens with roles, the audit log, live
-- flags, account status and spend controls, key spend controls, rate card labels and
-- package versions. Amounts are integer millicredits (1 credit = 1,000 mc).

-- Bearer tokens of the admin API, stored as SHA-256 digests (billing/admin_tokens.py).
CREATE TABLE admin_tokens (
    id              bigserial PRIMARY KEY,
    token_digest    bytea NOT NULL UNIQUE CHECK (octet_length(token_digest) = 32),
    token_prefix    text NOT NULL,
    name            text NOT NULL DEFAULT '',
    role            text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Who made it: an admin token's id, or NULL for the CLI (`creditgate admin create-token`).
    created_by_token_id bigint REFERENCES admin_tokens (id),
    expires_at      timestamptz,
    revoked_at      timestamptz,
    last_used_at    timestamptz
);

-- Every mutating admin call and CLI command: written in the same transaction as the change.
-- Append-only (functions/ledger_entries_append_only.sql binds its triggers here too); the
-- application's role may only read and append.
CREATE TABLE audit_log (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    -- 'token' (an admin token: actor_token_id and its name) or 'cli'.
    actor_kind      text NOT NULL CHECK (actor_kind IN ('token', 'cli')),
    actor_token_id  bigint REFERENCES admin_tokens (id),
    actor_name      text NOT NULL,
    -- e.g. 'account.create', 'key.revoke', 'rate_card.publish', 'flag.set'.
    action          text NOT NULL,
    target_type     text NOT NULL,
    target_id       text,
    before          jsonb,
    after           jsonb,
    request_id      text,
    client_address  text,
    CHECK ((actor_kind = 'token') = (actor_token_id IS NOT NULL))
);
CREATE INDEX audit_log_target_idx ON audit_log (target_type, target_id, id);
CREATE INDEX audit_log_actor_idx ON audit_log (actor_token_id, id);

-- Live flags: a row overrides the environment's initial value (runtime/live_flags.py).
CREATE TABLE flags (
    name            text PRIMARY KEY,
    value           jsonb NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    updated_by      text NOT NULL
);

-- Accounts: an operator's suspension, an external id, and spend controls. A NULL cap is no cap.
-- Windows are calendar days and months in UTC; spend counts what requests charged (and hold
-- while open), by the time each request started.
ALTER TABLE accounts
    ADD COLUMN external_id                  text UNIQUE,
    ADD COLUMN status                       text NOT NULL DEFAULT 'active'
                                              CHECK (status IN ('active', 'suspended')),
    ADD COLUMN suspended_at                 timestamptz,
    ADD COLUMN suspension_reason            text,
    ADD COLUMN daily_spend_cap_millicredits   bigint CHECK (daily_spend_cap_millicredits >= 0),
    ADD COLUMN monthly_spend_cap_millicredits bigint CHECK (monthly_spend_cap_millicredits >= 0),
    ADD COLUMN max_request_millicredits       bigint CHECK (max_request_millicredits >= 0),
    -- NULL: every model; otherwise only these.
    ADD COLUMN allowed_models               text[];
CREATE INDEX accounts_email_lower_idx ON accounts (lower(email) text_pattern_ops);

-- Keys: the same spend controls, and a requests-per-minute limit.
ALTER TABLE api_keys
    ADD COLUMN daily_spend_cap_millicredits   bigint CHECK (daily_spend_cap_millicredits >= 0),
    ADD COLUMN monthly_spend_cap_millicredits bigint CHECK (monthly_spend_cap_millicredits >= 0),
    ADD COLUMN max_request_millicredits       bigint CHECK (max_request_millicredits >= 0),
    ADD COLUMN allowed_models               text[],
    ADD COLUMN requests_per_minute          integer CHECK (requests_per_minute > 0);

-- Usage per key (last used, filters) and per account and time (spend windows, filters).
CREATE INDEX usage_events_api_key_id_idx ON usage_events (api_key_id, id);
CREATE INDEX usage_events_account_started_idx ON usage_events (account_id, started_at);
CREATE INDEX ledger_entries_created_at_idx ON ledger_entries (created_at, id);

-- Rate cards: a display label per model ("Eco", "Advanced").
ALTER TABLE rate_cards ADD COLUMN display_label text NOT NULL DEFAULT '';

-- Packages are versioned: an edit is a new row (version + 1) with the same code; the old one
-- is superseded. Price and credits are fixed per version; a purchase keeps the version it
-- bought (purchases.package_id). One current version per code.
ALTER TABLE packages DROP CONSTRAINT packages_code_key;
ALTER TABLE packages
    ADD COLUMN version          integer NOT NULL DEFAULT 1 CHECK (version > 0),
    ADD COLUMN tagline          text,
    ADD COLUMN superseded_at    timestamptz;
ALTER TABLE packages ADD CONSTRAINT packages_code_version_key UNIQUE (code, version);
CREATE UNIQUE INDEX packages_current_code_idx ON packages (code) WHERE superseded_at IS NULL;

GRANT SELECT, INSERT, UPDATE ON admin_tokens, flags TO creditgate_app;
GRANT SELECT, INSERT ON audit_log TO creditgate_app;
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM creditgate_app;
GRANT USAGE ON SEQUENCE admin_tokens_id_seq, audit_log_id_seq TO creditgate_app;
