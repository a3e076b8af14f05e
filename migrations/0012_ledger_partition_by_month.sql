-- usage_events and ledger_entries partitioned by month (RANGE), so the ledger of record grows
-- by months: billing/partitions.py creates the months ahead (create_month_partitions,
-- functions/) and `creditgate partitions detach --before YYYY-MM` detaches old ones to archive.
--
-- Partition keys, deterministic per request so the uniqueness that makes posting idempotent
-- survives (a partitioned table's unique key must contain its partition key):
--   usage_events    started_at: the settlement record's start time; unique (request_id,
--                   started_at), and post_settlements looks a request up by both.
--   ledger_entries  created_at: a settlement's deduction is dated at its request's start
--                   (post_settlements passes it), any other entry at its posting; unique
--                   (idempotency_key, created_at). Every writer (post_ledger_entries) looks a
--                   key up and writes under its account's row lock, so a key is posted once
--                   however its entry is dated.
-- Ids keep their sequences. Foreign keys that pointed AT ledger_entries (id alone is no
-- longer unique) are dropped: reverses_entry_id and purchases.purchase_entry_id are written
-- only from ids post_ledger_entries answered. Its key to accounts goes too, as usage_events'
-- did (0001): each new partition would clone it, locking accounts against every posting
-- (which deadlocked with one); post_ledger_entries, the only writer, locks each entry's
-- account row first and refuses an unknown account, and accounts are never deleted.
--
-- Rows outside every month partition land in the DEFAULT partition. This migration creates a
-- partition for every month from the oldest row to the current month (named as
-- create_month_partitions names them: <table>_pYYYY_MM) and copies the rows (ACCESS EXCLUSIVE
-- on both tables while it runs: stop the gateway fleet first, docs/design.md).

ALTER TABLE purchases DROP CONSTRAINT purchases_purchase_entry_id_fkey;

ALTER TABLE usage_events RENAME TO usage_events_unpartitioned;
ALTER SEQUENCE usage_events_id_seq OWNED BY NONE;
ALTER TABLE ledger_entries RENAME TO ledger_entries_unpartitioned;
ALTER SEQUENCE ledger_entries_id_seq OWNED BY NONE;

CREATE TABLE usage_events (
    id                          bigint NOT NULL DEFAULT nextval('usage_events_id_seq'),
    request_id                  text NOT NULL,
    account_id                  bigint NOT NULL,
    api_key_id                  bigint,
    model                       text NOT NULL,
    endpoint                    text NOT NULL,
    prompt_tokens               bigint NOT NULL DEFAULT 0,
    cached_tokens               bigint NOT NULL DEFAULT 0,
    completion_tokens           bigint NOT NULL DEFAULT 0,
    rate_card_id                bigint,
    input_millicredits_per_1k_tokens        bigint NOT NULL,
    cached_input_millicredits_per_1k_tokens bigint NOT NULL,
    output_millicredits_per_1k_tokens       bigint NOT NULL,
    rounding_mode               text NOT NULL CHECK (rounding_mode IN ('exact', 'ceil')),
    cost_millicredits           bigint NOT NULL CHECK (cost_millicredits >= 0),
    charged_millicredits        bigint NOT NULL CHECK (charged_millicredits >= 0),
    shortfall_millicredits      bigint NOT NULL DEFAULT 0 CHECK (shortfall_millicredits >= 0),
    hold_millicredits           bigint NOT NULL DEFAULT 0,
    usage_source                text NOT NULL CONSTRAINT usage_events_usage_source_check
                                  CHECK (usage_source IN ('upstream', 'estimated', 'clamped')),
    status                      text NOT NULL CHECK (status IN ('completed', 'client_disconnected',
                                                                 'upstream_error', 'uncharged')),
    started_at                  timestamptz NOT NULL,
    finished_at                 timestamptz NOT NULL,
    upstream_latency_ms         integer,
    recorded_at                 timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (started_at);
ALTER SEQUENCE usage_events_id_seq OWNED BY usage_events.id;

CREATE TABLE ledger_entries (
    id                              bigint NOT NULL DEFAULT nextval('ledger_entries_id_seq'),
    account_id                      bigint NOT NULL,
    entry_type                      text NOT NULL CHECK (entry_type IN
                                      ('purchase', 'deduction', 'refund', 'adjustment', 'reversal')),
    amount_millicredits             bigint NOT NULL,
    balance_after_millicredits      bigint NOT NULL CHECK (balance_after_millicredits >= 0),
    idempotency_key                 text NOT NULL,
    reference                       text,
    reverses_entry_id               bigint,
    created_at                      timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (created_at);
ALTER SEQUENCE ledger_entries_id_seq OWNED BY ledger_entries.id;

CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT;
CREATE TABLE ledger_entries_default PARTITION OF ledger_entries DEFAULT;

DO $$
DECLARE
    target text;
    first_month date;
    month date;
BEGIN
    FOREACH target IN ARRAY ARRAY['usage_events', 'ledger_entries'] LOOP
        EXECUTE format('SELECT date_trunc(''month'', min(%I) AT TIME ZONE ''UTC'')::date FROM %I',
                       CASE target WHEN 'usage_events' THEN 'started_at' ELSE 'created_at' END,
                       target || '_unpartitioned')
           INTO first_month;
        month := LEAST(COALESCE(first_month, 'infinity'),
                       date_trunc('month', now() AT TIME ZONE 'UTC')::date);
        WHILE month <= date_trunc('month', now() AT TIME ZONE 'UTC')::date LOOP
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           target || '_p' || to_char(month, 'YYYY_MM'), target,
                           month::timestamp AT TIME ZONE 'UTC',
                           (month + interval '1 month')::timestamp AT TIME ZONE 'UTC');
            month := month + interval '1 month';
        END LOOP;
    END LOOP;
END;
$$;

INSERT INTO usage_events SELECT * FROM usage_events_unpartitioned;
INSERT INTO ledger_entries SELECT * FROM ledger_entries_unpartitioned;
DROP TABLE usage_events_unpartitioned;
DROP TABLE ledger_entries_unpartitioned;

-- Keys and indexes after the copy (one build each, not one insert at a time).
ALTER TABLE usage_events ADD CONSTRAINT usage_events_pkey PRIMARY KEY (id, started_at);
ALTER TABLE usage_events
    ADD CONSTRAINT usage_events_request_id_key UNIQUE (request_id, started_at);
CREATE INDEX usage_events_account_id_idx ON usage_events (account_id, id);
CREATE INDEX usage_events_api_key_id_idx ON usage_events (api_key_id, id);
CREATE INDEX usage_events_account_started_idx ON usage_events (account_id, started_at);
CREATE INDEX usage_events_recorded_at_brin ON usage_events USING brin (recorded_at);
-- Reconciliation's per-day check reads a day of usage by started_at (rows arrive in about
-- that order, so BRIN: next to nothing per insert).
CREATE INDEX usage_events_started_at_brin ON usage_events USING brin (started_at);

ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_pkey PRIMARY KEY (id, created_at);
ALTER TABLE ledger_entries
    ADD CONSTRAINT ledger_entries_idempotency_key_key UNIQUE (idempotency_key, created_at);
CREATE INDEX ledger_entries_account_id_idx ON ledger_entries (account_id, id);
CREATE INDEX ledger_entries_account_created_idx ON ledger_entries (account_id, created_at);
CREATE INDEX ledger_entries_created_at_idx ON ledger_entries (created_at, id);

GRANT SELECT, INSERT, UPDATE ON usage_events TO creditgate_app;
GRANT SELECT, INSERT ON ledger_entries TO creditgate_app;
REVOKE UPDATE, DELETE, TRUNCATE ON ledger_entries FROM creditgate_app;

-- What detached (archived) ledger months held, per account, written by
-- `creditgate partitions detach` in the transaction that detaches them: the ledger still sums
-- to every balance (reconciliation, statements) with the archived months counted here.
CREATE TABLE ledger_archived_totals (
    partition_name          text NOT NULL,
    account_id              bigint NOT NULL REFERENCES accounts (id),
    amount_millicredits     bigint NOT NULL,
    entries                 bigint NOT NULL,
    archived_at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, partition_name)
);
GRANT SELECT ON ledger_archived_totals TO creditgate_app;

-- post_ledger_entries gains entry_times (functions/post_ledger_entries.sql): the old
-- signature goes, so a call with seven arguments names the new one (its last has a default).
DROP FUNCTION IF EXISTS post_ledger_entries(bigint[], text[], bigint[], text[], text[], bigint[],
                                            text[]);
