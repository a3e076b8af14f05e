-- Outbox entries Postgres refused for their data (a value out of range, an unknown account,
-- API key or rate card, a constraint) or that could not be read at all. The settlement poster
-- (billing/metering/posting.py) isolates each such entry from its batch, writes it here, and
-- only then releases its charge from the account's Redis `pending` and deletes it from the
-- stream (billing/metering/lua/dead_letter.lua). `creditgate outbox dead-letters` lists the
-- rows; `creditgate outbox replay ENTRY_ID` posts one after the cause was fixed and sets
-- replayed_at. Amounts in millicredits.
CREATE TABLE settlement_dead_letters (
    id                    bigserial PRIMARY KEY,
    -- The Redis stream entry id (e.g. 1733212345678-0): one row per entry, however often a
    -- poster that crashed before deleting the entry meets it again.
    stream_entry_id       text NOT NULL UNIQUE,
    -- From the entry when readable, else NULL.
    request_id            text,
    account_id            bigint,
    -- What the settle script charged and held in `pending` (released when dead-lettered).
    charged_millicredits  bigint,
    -- The record payload as written (field p), or the whole entry as JSON when it had none.
    payload               text NOT NULL,
    error                 text NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    replayed_at           timestamptz
);
CREATE INDEX settlement_dead_letters_unreplayed_idx
    ON settlement_dead_letters (id) WHERE replayed_at IS NULL;

GRANT SELECT, INSERT, UPDATE ON settlement_dead_letters TO creditgate_app;
GRANT USAGE ON SEQUENCE settlement_dead_letters_id_seq TO creditgate_app;
